"""Next tokens on the device: greedy, temperature + top-p, or teacher-forced, for a whole batch at once.

Settings live per slot on the device (written once at admission), so a step makes no host
transfer to sample. The draw is an exponential race: `argmax(p / e)` with e ~ Exp(1) picks token
t with probability p[t], needs no sort of the vocabulary, and takes a per-request generator where
a seed is set.

Degenerate rows (the clamp rule): a row samples only if its tempered distribution is finite; one
whose temperature is 0 or underflows to 0 in float32, or whose logits hold inf or NaN, takes the
greedy token instead. The rule is decided on the device, row by row, without a sync.
"""

import torch
from torch import Tensor

from elastic_ray.engine.sequence import Sequence


class Sampler:
    """Per-slot sampling settings [slots] and teacher-forced tokens [slots, max_tokens] (-1: sample)."""

    def __init__(self, num_slots: int, max_tokens: int, device):
        self.temperature = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.top_p = torch.ones(num_slots, dtype=torch.float32, device=device)
        self.forced = torch.full((num_slots, max_tokens), -1, dtype=torch.long, device=device)
        self.drawn = torch.zeros(num_slots, dtype=torch.long, device=device)  # tokens drawn per slot

    def admit(self, first: int, seqs: list[Sequence]) -> None:
        """Store the settings of sequences entering slots [first, first + len(seqs)): one copy each."""
        rows = slice(first, first + len(seqs))
        device = self.temperature.device
        self.temperature[rows] = torch.tensor([s.sampling.temperature for s in seqs], dtype=torch.float32).to(device)
        self.top_p[rows] = torch.tensor([s.sampling.top_p for s in seqs], dtype=torch.float32).to(device)
        forced = torch.full((len(seqs), self.forced.shape[1]), -1, dtype=torch.long)
        for row, seq in enumerate(seqs):
            if seq.forced is not None:
                forced[row, : len(seq.forced)] = torch.tensor(seq.forced)
        self.forced[rows] = forced.to(device)
        self.drawn[rows] = 0

    def move(self, source: int, target: int) -> None:
        for t in (self.temperature, self.top_p, self.forced, self.drawn):
            t[target] = t[source]

    def sample(self, logits: Tensor, first: int, seqs: list[Sequence]) -> tuple[Tensor, Tensor | None]:
        """Tokens [n] for the sequences in slots [first, first + n) (logits [>= n, vocab]), and the
        log-probability of each teacher-forced token ([n], None when no sequence is forced)."""
        n = len(seqs)
        rows = slice(first, first + n)
        logits = logits[:n].float()
        tokens = logits.argmax(-1)
        if any(s.sampling.temperature > 0 for s in seqs):
            tokens = _draw(logits, tokens, self.temperature[rows], self.top_p[rows],
                           _noise(logits.shape, [s.generator for s in seqs], logits.device),
                           nucleus=any(s.sampling.top_p < 1.0 for s in seqs))
        logprobs = None
        if any(s.forced is not None for s in seqs):
            forced = self.forced[rows].gather(1, self.drawn[rows, None]).squeeze(1)
            tokens = torch.where(forced >= 0, forced, tokens)
            logprobs = logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
        self.drawn[rows] += 1
        return tokens, logprobs


def _noise(shape: torch.Size, generators: list, device) -> Tensor:
    """Exp(1) noise [n, vocab]: rows with a generator draw from it, the others from the global one."""
    noise = torch.empty(shape, device=device).exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:
            noise[row].exponential_(generator=generator)
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # no 0: p / 0 would be a NaN race


def _draw(logits: Tensor, greedy: Tensor, temperature: Tensor, top_p: Tensor, noise: Tensor, nucleus: bool) -> Tensor:
    """Temperature and top-p sampling row by row, with the clamp rule (module docstring)."""
    # Shifting by the row's maximum first: tiny temperatures then give -inf, never inf / inf.
    probs = ((logits - logits.amax(-1, keepdim=True)) / temperature[:, None]).softmax(-1)
    if nucleus:
        sorted_probs, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p, and always the top token (a top_p that
        # underflows float32 to 0 would otherwise keep nothing)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p[:, None]
        outside[:, 0] = False
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    sampled = (probs / noise).argmax(-1)
    samples = (temperature > 0) & torch.isfinite(probs).all(-1)
    return torch.where(samples, sampled, greedy)
