"""Fixed-size KV slots: the engine's one KV layout, written by the prompt stage and by every decode step.

Layer l keeps up to `sizes[l]` entries per slot: `keys[l][slot, head, column]` (values, positions
and scores alike). Row state is per layer, so layers may keep different counts:

- `lengths[l, slot]`: columns in use, [0, lengths) (entries are never moved, so this also bounds
  what a step reads);
- `free[l, slot, head]`: the column the last step evicted, -1 if none. The next step writes its
  entry there, so eviction never shifts memory; until then the column is dead (masked by the
  attention backend only through `lengths`, which it never exceeds: a step fills the hole first).

The prompt stage writes the kept entries in position order into [0, C0); entries before a row's
truncation point are never evicted, so they stay in columns [0, truncation) in order (the
eviction rule relies on that). Busy slots are always [0, n): the scheduler moves the last busy
slot into a freed one.
"""

import torch
from torch import Tensor

from elastic_ray.kv.entries import CompressedEntries
from elastic_ray.kv.policy import CachePolicy


class KVSlots:
    """Per-layer key/value buffers [slots, kv_heads, size, head_dim] and per-layer, per-slot state."""

    def __init__(self, num_slots: int, sizes: list[int], kv_heads: int, head_dim: int, dtype: torch.dtype, device,
                 with_scores: bool):
        # zeros, not empty: masked columns are still multiplied, and 0 * NaN would poison a row
        self.keys = [torch.zeros(num_slots, kv_heads, s, head_dim, dtype=dtype, device=device) for s in sizes]
        self.values = [torch.zeros(num_slots, kv_heads, s, head_dim, dtype=dtype, device=device) for s in sizes]
        self.positions = [torch.full((num_slots, kv_heads, s), -1, dtype=torch.int32, device=device) for s in sizes]
        self.scores = ([torch.zeros(num_slots, kv_heads, s, dtype=torch.float32, device=device) for s in sizes]
                       if with_scores else None)
        layers = len(sizes)
        self.lengths = torch.zeros(layers, num_slots, dtype=torch.long, device=device)
        self.free = torch.full((layers, num_slots, kv_heads), -1, dtype=torch.long, device=device)
        self.truncation = torch.zeros(layers, num_slots, dtype=torch.long, device=device)
        self.seen = torch.zeros(num_slots, dtype=torch.long, device=device)  # real tokens fed, prompt included
        self.rows = torch.arange(num_slots, device=device)
        self.heads = torch.arange(kv_heads, device=device)
        self.num_slots, self.sizes = num_slots, sizes

    @property
    def kv_bytes(self) -> int:
        """Bytes of the key/value buffers: what the KV memory budget pays for."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def tensors(self) -> list[Tensor]:
        """Every tensor a decode step reads or writes (CUDA graphs need their addresses fixed)."""
        return [*self.keys, *self.values, *self.positions, *(self.scores or []),
                self.lengths, self.free, self.truncation, self.seen, self.rows, self.heads]

    def entries(self) -> Tensor:
        """[layers, slots] entries stored (the evicted, dead column not counted)."""
        return self.lengths - (self.free[:, :, 0] >= 0).long()

    def store_prompt(self, layer: int, first: int, kept: CompressedEntries, truncation: Tensor,
                     scores: Tensor | None) -> None:
        """Write a prefilled batch's kept entries (packed left, in position order) into slots
        [first, first + B) of `layer`, and reset those slots' state for that layer."""
        batch, _, width, _ = kept.keys.shape
        if width > self.sizes[layer]:
            raise RuntimeError(f"a compressed prompt of {width} entries does not fit a slot of {self.sizes[layer]}")
        rows = slice(first, first + batch)
        self.keys[layer][rows, :, :width] = kept.keys
        self.values[layer][rows, :, :width] = kept.values
        self.positions[layer][rows] = -1
        self.positions[layer][rows, :, :width] = kept.positions.to(torch.int32)
        if self.scores is not None:
            self.scores[layer][rows] = 0.0
            if scores is not None:
                self.scores[layer][rows, :, :width] = scores
        self.lengths[layer, rows] = kept.lengths
        self.free[layer, rows] = -1
        self.truncation[layer, rows] = truncation

    def append(self, layer: int, key: Tensor, value: Tensor, active: Tensor) -> Tensor:
        """Write each row's new entry (key, value [n, H, D]) into the column its last step freed, or
        after its entries; rows [0, n) are slots [0, n), inactive ones (batch padding) write column 0
        of their free slot and change nothing else. Returns the rows' lengths after the write [n]."""
        n, heads = key.shape[:2]
        free = self.free[layer, :n]
        lengths = self.lengths[layer, :n]
        column = torch.where(active[:, None], torch.where(free >= 0, free, lengths[:, None]), 0)
        index = (self.rows[:n, None], self.heads[None, :], column)
        self.keys[layer].index_put_(index, key)
        self.values[layer].index_put_(index, value)
        self.positions[layer].index_put_(index, (self.seen[:n, None] - 1).to(torch.int32).expand(n, heads))
        if self.scores is not None:
            self.scores[layer].index_put_(index, torch.zeros(n, heads, dtype=torch.float32, device=key.device))
        lengths = lengths + (active & (free[:, 0] < 0)).long()
        self.lengths[layer, :n] = lengths
        return lengths

    def evict(self, layer: int, lengths: Tensor, active: Tensor, width: int, policy: CachePolicy) -> None:
        """After the step's attention: each over-budget row frees its victim's column (spec §10)."""
        n = lengths.shape[0]
        seen = self.seen[:n]
        over = policy.over_budget(lengths, seen) & active
        scores = None if self.scores is None else self.scores[layer][:n, :, :width]
        victims = policy.victims(self.positions[layer][:n, :, :width], lengths, self.truncation[layer, :n], seen,
                                 scores)
        self.free[layer, :n] = torch.where(over[:, None], victims, -1)

    def move(self, source: int, target: int) -> None:
        """Copy slot `source` into slot `target` (compaction after a sequence finishes)."""
        for tensors in (self.keys, self.values, self.positions, self.scores or []):
            for t in tensors:
                t[target] = t[source]
        for t in (self.lengths, self.free, self.truncation):
            t[:, target] = t[:, source]
        self.seen[target] = self.seen[source]
