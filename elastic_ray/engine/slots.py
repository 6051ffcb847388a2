"""Fixed-size KV slots: one preallocated buffer per layer, one slot per running sequence.

Layout: slot s of layer l holds its entries left-aligned in `keys[l][s, :, :lengths[s]]`,
in the order the method keeps them. Busy slots are always `[0, n)` (the scheduler moves the
last busy slot into a freed one), so a decode step works on plain views `buffer[:n]`.
"""

import torch
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin

from elastic_ray.hf.cache import CompressedLayer, PolicyCache
from elastic_ray.kv.policy import CachePolicy


class KVSlots:
    """Per-layer key/value buffers [slots, kv_heads, slot_size, head_dim] and per-slot state."""

    def __init__(self, num_layers: int, num_slots: int, slot_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, with_scores: bool):
        shape = (num_slots, kv_heads, slot_size)
        # zeros, not empty: masked columns are still multiplied, and 0 * NaN would poison a row
        self.keys = [torch.zeros(*shape, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(*shape, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.positions = [torch.full(shape, -1, dtype=torch.int32, device=device) for _ in range(num_layers)]
        self.scores = [torch.zeros(shape, dtype=torch.float32, device=device) for _ in range(num_layers)] if with_scores else None
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.seen = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.truncation = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.num_slots, self.slot_size = num_slots, slot_size

    @property
    def kv_bytes(self) -> int:
        """Bytes of the key/value buffers: what the KV memory budget pays for."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def store_prompt(self, slots: Tensor, layer_idx: int, layer: CompressedLayer) -> None:
        """Copy a prefilled batch's compressed layer (rows right-aligned) into `slots` (left-aligned)."""
        width = min(layer.width, self.slot_size)
        if int(layer.lengths.max()) > width:
            raise RuntimeError("a compressed prompt does not fit its slot")
        self.keys[layer_idx][slots, :, :width] = layer.logical(layer.keys)[:, :, :width]
        self.values[layer_idx][slots, :, :width] = layer.logical(layer.values)[:, :, :width]
        self.positions[layer_idx][slots, :, :width] = layer.logical(layer.positions)[:, :, :width].int()
        if self.scores is not None:
            self.scores[layer_idx][slots] = 0.0
            if layer.scores is not None:
                self.scores[layer_idx][slots, :, :width] = layer.logical(layer.scores)[:, :, :width].float()

    def move(self, source: int, target: int) -> None:
        """Copy slot `source` into slot `target` (compaction after a sequence finishes)."""
        for tensors in (self.keys, self.values, self.positions, self.scores or []):
            for t in tensors:
                t[target] = t[source]
        for t in (self.lengths, self.seen, self.truncation):
            t[target] = t[source]


class SlotLayer(CacheLayerMixin):
    """One layer's busy slots during one decode step; `keys`/`values` are views of the buffer."""

    compressed = True
    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, keys: Tensor, values: Tensor, positions: Tensor, scores: Tensor | None, lengths: Tensor):
        super().__init__()
        self.buffers = (keys, values, positions, scores)  # [n, H, slot_size, *] views
        self.lengths = lengths.clone()
        self.width = int(lengths.max()) + 1  # stored entries of the longest slot, plus the new token
        self.keys, self.values, self.positions, self.scores = (
            None if t is None else t[:, :, : self.width] for t in self.buffers
        )
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Nothing to do: the buffers exist before the step."""

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if key_states.shape[-2] != 1:
            raise RuntimeError("a slot cache takes one token per sequence per forward")
        column = self.lengths[:, None, None, None].expand(*key_states.shape)
        self.keys.scatter_(2, column, key_states)
        self.values.scatter_(2, column, value_states)
        self.lengths = self.lengths + 1
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.width, 0

    def get_seq_length(self) -> int:
        return self.width - 1

    def get_max_length(self) -> int:
        return self.buffers[0].shape[2]

    def valid(self) -> Tensor:
        """[n, W] bool, the columns that hold entries."""
        return torch.arange(self.width, device=self.lengths.device)[None, :] < self.lengths[:, None]

    def logical(self, tensor: Tensor) -> Tensor:
        return tensor  # left-aligned: physical order is logical order

    def record_new_positions(self, seen: Tensor) -> None:
        """Label the entry just appended with its original token index."""
        column = (self.lengths - 1)[:, None, None].expand(-1, self.positions.shape[1], 1)
        self.positions.scatter_(2, column, (seen - 1)[:, None, None].expand_as(column).to(self.positions.dtype))

    def evict(self, rows: Tensor, victims: Tensor) -> None:
        """Delete entry `victims[b, h]` of each row in `rows`, shifting newer entries left.

        Only columns from the lowest victim on move: Elastic Cache evicts at a fixed point near
        the end, so a step copies a few columns per row, not the whole cache.
        """
        if not bool(rows.any()):
            return
        first = int(victims[rows].min())
        column = torch.arange(first, self.width, device=rows.device)[None, None, :]
        index = (column + (rows[:, None, None] & (column >= victims[:, :, None])).long()).clamp(max=self.width - 1)
        index -= first
        for view in (self.keys, self.values, self.positions, self.scores):
            if view is not None:
                window = view[:, :, first:]
                gather_index = index if view.dim() == 3 else index[..., None].expand(*index.shape, view.shape[-1])
                window.copy_(window.gather(2, gather_index))
        self.lengths = self.lengths - rows.long()


class SlotCache(PolicyCache):
    """The busy slots `[0, n)` of `KVSlots` as a transformers cache, for one decode forward."""

    prefilled = True

    def __init__(self, slots: KVSlots, n: int, policy: CachePolicy):
        scores = slots.scores or [None] * len(slots.keys)
        layers = [
            SlotLayer(k[:n], v[:n], p[:n], None if s is None else s[:n], slots.lengths[:n])
            for k, v, p, s in zip(slots.keys, slots.values, slots.positions, scores)
        ]
        super().__init__(policy, layers)
        self.slots, self.n = slots, n
        self.seen = slots.seen[:n].clone()
        self.truncation = slots.truncation[:n]

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.layers[0].width - 1  # every stored column is causally visible to the new token

    def begin_step(self) -> Tensor:
        """Advance one token; returns the 2-D mask [n, W]: stored entries plus the new one."""
        stored = self.layers[0].lengths
        self.seen = self.seen + 1
        self.evicting = self.policy.over_budget(stored + 1, self.seen)
        return torch.arange(self.layers[0].width, device=stored.device)[None, :] <= stored[:, None]

    def end_step(self) -> None:
        self.slots.lengths[: self.n] = self.layers[0].lengths
        self.slots.seen[: self.n] = self.seen
