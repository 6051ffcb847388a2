"""Runs the model: prefill a batch of prompts into their slots, or one decode step over the busy slots.

Both are one plain `model(...)` call. The text decoder's attention is the engine's own backend
(`engine/attention.py`, registered by `attention.install`): it finds its work in the
`PrefillBatch` or `DecodeBatch` passed under `attention.KEYWORD`, and does the KV writes,
compression and eviction there. A decode step's tensor shapes depend only on its batch bucket and
width, and it reads nothing back to the host: tokens come from `last_token`, positions from
`next_position`, both on the device; the sampled tokens travel to the host on their own
(`engine/readback.py`).
"""

import torch
from torch import Tensor, nn

from elastic_ray.engine.attention import KEYWORD, DecodeBatch, PrefillBatch, install, prompt_mask
from elastic_ray.engine.readback import Copy, Readback
from elastic_ray.engine.sampler import Sampler
from elastic_ray.engine.sequence import Sequence
from elastic_ray.engine.slots import KVSlots
from elastic_ray.kv.entries import pack_order
from elastic_ray.kv.policy import CachePolicy
from elastic_ray.models.family import MROPE, Family

SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
WIDTH_STEP = 32  # an eager decode step reads its busy columns rounded up to this


def collate(inputs: list[dict[str, Tensor]], pad_token_id: int) -> dict[str, Tensor]:
    """Batch single-prompt processor outputs as the processor would: sequences left-padded,
    image tensors concatenated along their first dimension."""
    batch = {}
    for key in inputs[0]:
        tensors = [x[key] for x in inputs]
        if key in SEQUENCE_KEYS:
            width = max(t.shape[-1] for t in tensors)
            fill = pad_token_id if key == "input_ids" else 0
            tensors = [torch.nn.functional.pad(t, (width - t.shape[-1], 0), value=fill) for t in tensors]
        batch[key] = torch.cat(tensors, dim=0)
    return batch


def batch_buckets(num_slots: int) -> list[int]:
    """Decode batch sizes a compiled engine runs: powers of two from 2, and all its slots. Never 1
    (with more slots than that): dynamo would specialise a graph for it."""
    return sorted({min(max(2, 1 << k), num_slots) for k in range(num_slots.bit_length() + 1)})


class ModelRunner:
    """The model, its slots and sampler, and per slot on the device: the next RoPE position
    ([slots, R]; R = 1, or 4 for M-RoPE), the last token, and whether the slot is busy."""

    def __init__(self, model: nn.Module, family: Family, policy: CachePolicy, slots: KVSlots, sampler: Sampler,
                 pad_token_id: int, compile: bool):
        self.model, self.family, self.policy, self.slots, self.sampler = model, family, policy, slots, sampler
        self.layer_policies = policy.layer_policies(len(family.attentions))
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        install(model, family)
        num_slots = slots.num_slots
        self.next_position = torch.zeros(num_slots, 4 if family.model_type in MROPE else 1, dtype=torch.long,
                                          device=self.device)
        self.last_token = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        self.busy = torch.zeros(num_slots, dtype=torch.bool, device=self.device)
        self.readback = Readback(num_slots, self.device)
        # A 4-D attention mask is taken as given, so transformers builds none: the backend masks per layer.
        self.no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)
        self.compiled = compile
        self.buckets = batch_buckets(num_slots) if compile else None
        self.forward = self._decode_forward
        if compile:
            self.forward = _compile(self._decode_forward, self.device, [
                *slots.tensors(), self.next_position, self.last_token, self.busy, self.no_mask])

    @torch.no_grad()
    def prefill(self, seqs: list[Sequence]) -> Tensor:
        """Run the prompts of `seqs` (which hold consecutive slots) and store their kept entries in
        their slots. Returns the last-position logits [k, vocab]."""
        first = seqs[0].slot
        inputs = {
            k: v.to(self.device, dtype=self.dtype if v.is_floating_point() else None)
            for k, v in collate([s.inputs for s in seqs], self.pad_token_id).items()
        }
        # positions exactly as generate() builds them (M-RoPE models compute their 3-D index here)
        positions = self.model._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))
        real = inputs.pop("attention_mask").bool()
        lengths = [s.prompt_tokens for s in seqs]
        batch = PrefillBatch(
            self.slots, self.policy, first, real, self.family.image_mask(inputs["input_ids"]),
            torch.tensor(lengths, device=self.device), pack_order(real), prompt_mask(real),
            padded=min(lengths) < max(lengths),
        )
        out = self.model(**inputs, attention_mask=self.no_mask, position_ids=positions, use_cache=False,
                         logits_to_keep=1, **{KEYWORD: batch})
        rows = slice(first, first + len(seqs))
        self.slots.seen[rows] = batch.lengths
        last = positions[..., -1]  # [B] or [R, B]
        self.next_position[rows] = (last[:, None] if last.dim() == 1 else last.T) + 1
        self.busy[rows] = True
        self.sampler.admit(first, seqs)
        for seq in seqs:
            seq.prompt_stored(self.layer_policies)
        return out.logits[:, -1]

    @torch.no_grad()
    def decode(self, n: int, columns: int) -> Tensor:
        """One step for slots [0, n): feed each its last token. `columns`: the most columns a row uses
        once this step has written its entry. Returns logits [bucket, vocab] (rows past n pad the batch)."""
        size = max(self.slots.sizes)
        if self.buckets is None:
            return self.forward(DecodeBatch(self.slots, self.policy, self.busy[:n],
                                            min(size, -(-columns // WIDTH_STEP) * WIDTH_STEP)))
        active = self.busy[: next(b for b in self.buckets if b >= n)]
        torch._dynamo.mark_dynamic(active, 0)  # one graph for every bucket: the batch size is symbolic
        return self.forward(DecodeBatch(self.slots, self.policy, active, size))

    def _decode_forward(self, batch: DecodeBatch) -> Tensor:
        """The decode step as one function of device state (what `EngineConfig.compile` captures)."""
        active = batch.active
        bucket = active.shape[0]
        self.slots.seen[:bucket] += active
        if self.policy.positions == "compact":  # rotate at the stored count (the first layer's), not the index
            positions = self.slots.entries()[0, :bucket, None]
        else:
            positions = self.next_position[:bucket]
            positions = positions if positions.shape[1] == 1 else positions.T[:, :, None]
        logits = self.model(input_ids=self.last_token[:bucket, None], attention_mask=self.no_mask,
                            position_ids=positions, use_cache=False, logits_to_keep=1, **{KEYWORD: batch}).logits
        self.next_position[:bucket] += active[:, None]
        return logits[:, -1]

    def sample(self, logits: Tensor, first: int, seqs: list[Sequence]) -> Copy:
        """Draw the next token of the sequences in slots [first, first + n), keep it on the device as
        their next input, and start its copy to the host (the step's one device-to-host transfer)."""
        tokens, logprobs = self.sampler.sample(logits, first, seqs)
        self.last_token[first : first + len(seqs)] = tokens
        return self.readback.start(first, tokens, logprobs)

    def move(self, source: int, target: int) -> None:
        self.slots.move(source, target)
        self.sampler.move(source, target)
        for t in (self.next_position, self.last_token):
            t[target] = t[source]

    def set_busy(self, n: int) -> None:
        """Slots [0, n) hold sequences, the rest are free."""
        self.busy[:n] = True
        self.busy[n:] = False


def _compile(forward, device: torch.device, state: list[Tensor]):
    """`forward` under torch.compile, whole (fullgraph: a graph break is an error), one graph with a
    symbolic batch size; on CUDA each batch bucket's step is recorded and replayed as a CUDA graph,
    with the state's addresses fixed."""
    if device.type == "cuda":
        for tensor in state:
            torch._dynamo.mark_static_address(tensor)
    # a process may hold several engines, each with its own graph (it guards on its own state)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(forward, fullgraph=True, mode=mode)
