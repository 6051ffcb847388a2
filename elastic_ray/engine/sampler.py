"""Next tokens from last-position logits: greedy, or temperature + top-p per sequence."""

import torch
from torch import Tensor

from elastic_ray.engine.sequence import Sequence


def sample(logits: Tensor, seqs: list[Sequence]) -> list[int]:
    """One token per row of `logits` [n, vocab], each row following its sequence's params.

    A teacher-forced sequence gets its next forced token, and that token's log-probability
    is appended to `seq.logprobs`.
    """
    tokens = logits.argmax(dim=-1).tolist()
    for row, seq in enumerate(seqs):
        params = seq.sampling
        if seq.forced is not None:
            tokens[row] = seq.forced[len(seq.generated)]
            seq.logprobs.append(float(torch.log_softmax(logits[row].float(), dim=-1)[tokens[row]]))
            continue
        if params.temperature == 0.0:
            continue
        probs = torch.softmax(logits[row].float() / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (the top token always stays)
            outside = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
        tokens[row] = int(torch.multinomial(probs, 1, generator=seq.generator))
    return tokens
