"""A transformers `Cache` whose layers hold compressed, per-row packed entries.

Layout: row b's entries sit right-aligned in every layer, in the order the method keeps
them; the decode mask marks exactly those columns (plus the new token), so rows can keep
different counts. Spec: shared/notes/transformers-cache.md §4.
"""

import inspect

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, CacheLayerMixin

from elastic_ray.kv.entries import Selection, apply_selection, pack_order
from elastic_ray.kv.policy import CachePolicy


def cache_keyword(model: nn.Module) -> str:
    """The keyword `model.forward` takes its cache by: `cache` from transformers 5.24,
    `past_key_values` before (5.24 still accepts the old name, with a warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def passed_cache(kwargs: dict):
    """The cache a forward was called with, under either keyword."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _gather_columns(tensor: Tensor, index: Tensor) -> Tensor:
    """tensor [B, H, W, *], index [B, H, W'] -> [B, H, W', *]."""
    if tensor.dim() == 3:
        return tensor.gather(2, index)
    return tensor.gather(2, index.unsqueeze(-1).expand(*index.shape, tensor.shape[-1]))


def _grow(tensor: Tensor, fill) -> Tensor:
    """Add one column (dim 2) filled with `fill`."""
    return torch.cat([tensor, tensor.new_full((*tensor.shape[:2], 1, *tensor.shape[3:]), fill)], dim=2)


class CompressedLayer(CacheLayerMixin):
    """One decoder layer's entries: the raw prompt until the prompt stage, then compressed.

    Rows are right-aligned: row b's entries fill columns [W - lengths[b], W), so with nothing
    removed the layout is exactly the left-padded one of a plain `DynamicCache`.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self):
        super().__init__()
        self.compressed = False
        self.lengths: Tensor | None = None  # [B] entries per row
        self.positions: Tensor | None = None  # [B, H, W] original token index of each entry, -1 = empty
        self.scores: Tensor | None = None  # [B, H, W] accumulated attention (methods that need it)
        self.truncation: Tensor | None = None  # [B] each row's fixed eviction index in this layer
        self.seen_tokens = 0  # logical columns seen, pads included

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen_tokens += key_states.shape[-2]
        if not self.compressed:
            if self.keys is not None:
                raise RuntimeError("a compressed cache takes the whole prompt in one forward")
            self.keys, self.values = key_states, value_states
            return self.keys, self.values
        if key_states.shape[-2] != 1:
            raise RuntimeError("after the prompt stage a compressed cache takes one token per forward")
        self.keys = torch.cat([self.keys, key_states], dim=2)
        self.values = torch.cat([self.values, value_states], dim=2)
        self.positions = _grow(self.positions, -1)
        if self.scores is not None:
            self.scores = _grow(self.scores, 0.0)
        self.lengths = self.lengths + 1
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self.compressed:
            return query_length, 0
        return self.keys.shape[2] + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    @property
    def width(self) -> int:
        return self.keys.shape[2]

    def logical_index(self) -> Tensor:
        """[B, W] physical column of each row's i-th entry (wrapping past the row's end)."""
        columns = torch.arange(self.width, device=self.lengths.device)[None, :]
        return (columns + self.width - self.lengths[:, None]) % self.width

    def compress_prompt(self, selection: Selection, order: Tensor, scores: Tensor | None, policy: CachePolicy) -> None:
        """Replace the raw, left-padded prompt by the selected entries, right-aligned per row, and set
        the rows' truncation points by this layer's `policy`.

        order: [B, S] the prompt columns with each row's real ones first (`pack_order`).
        """
        heads = self.keys.shape[1]
        packed_index = order[:, None, :].expand(-1, heads, -1)
        kept = apply_selection(
            _gather_columns(self.keys, packed_index), _gather_columns(self.values, packed_index), selection
        )
        if scores is not None:  # [B, H, T] in packed order, carried along for methods that accumulate
            kept_scores = scores.gather(2, kept.positions.clamp(min=0)).masked_fill(kept.positions < 0, 0.0)
        self.keys, self.values, self.lengths = kept.keys, kept.values, kept.lengths
        # Packed-left -> right-aligned: column j takes packed entry (j + length) mod W.
        width = self.width
        index = (torch.arange(width, device=order.device)[None, :] + self.lengths[:, None]) % width
        index = index[:, None, :].expand(-1, heads, -1)
        self.keys, self.values = _gather_columns(self.keys, index), _gather_columns(self.values, index)
        self.positions = self._blank(_gather_columns(kept.positions, index), -1)
        self.scores = None if scores is None else self._blank(_gather_columns(kept_scores, index), 0.0)
        self.truncation = policy.truncation_points(self.lengths)
        self.compressed = True

    def valid(self) -> Tensor:
        """[B, W] bool, the columns that hold entries."""
        return torch.arange(self.width, device=self.lengths.device)[None, :] >= (self.width - self.lengths)[:, None]

    def step_mask(self) -> Tensor:
        """[B, W+1] bool: a decode step's keys, the stored entries and the new one."""
        return torch.cat([self.valid(), self.lengths.new_ones(self.lengths.shape[0], 1, dtype=torch.bool)], dim=1)

    def _blank(self, tensor: Tensor, fill) -> Tensor:
        return tensor.masked_fill(~self.valid()[:, None, :], fill)

    def record_new_positions(self, seen: Tensor) -> None:
        """Label the entry just appended (the last column) with its original token index."""
        self.positions[:, :, -1] = (seen - 1)[:, None]

    def logical(self, tensor: Tensor) -> Tensor:
        """[B, H, W, *] in physical columns -> each row's entries first, in order."""
        return _gather_columns(tensor, self.logical_index()[:, None, :].expand(*tensor.shape[:3]))

    def evict(self, rows: Tensor, victims: Tensor) -> None:
        """Delete each row's `victims[b, h]`-th entry (rows in `rows`), shifting older entries right."""
        if not bool(rows.any()):
            return
        width = self.width
        column = torch.arange(width, device=self.keys.device)[None, None, :]
        victim_column = (width - self.lengths)[:, None, None] + victims[:, :, None]
        shift = rows[:, None, None] & (column <= victim_column)
        index = (column - shift.long()).clamp(min=0)
        self.keys, self.values = _gather_columns(self.keys, index), _gather_columns(self.values, index)
        self.positions = _gather_columns(self.positions, index)
        if self.scores is not None:
            self.scores = _gather_columns(self.scores, index)
        self.lengths = self.lengths - rows.long()
        self._trim()

    def _trim(self) -> None:
        """Drop the leading columns that no row uses any more."""
        start = self.width - int(self.lengths.max())
        self.keys, self.values = self.keys[:, :, start:], self.values[:, :, start:]
        self.positions = self._blank(self.positions[:, :, start:], -1)
        if self.scores is not None:
            self.scores = self._blank(self.scores[:, :, start:], 0.0)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        raise NotImplementedError("beam search is not supported with a compressed cache")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise NotImplementedError("batch selection is not supported with a compressed cache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("batch expansion is not supported with a compressed cache")


class CompressedCache(Cache):
    """One `CompressedLayer` per decoder layer, for one `generate()` call, driven by the hooks.

    `seen` [B] counts real tokens (prompt without pads, plus tokens fed since). Layer l follows
    `layer_policies[l]` (the policy's `for_layer`); with a per-layer split, layers keep different
    counts, so each decode step masks each layer by its own entries (`per_layer_masks`).
    `image` [B, S]: the prompt's image tokens (`Family.image_mask(input_ids)`), columns as the
    prompt's; the caller sets it, since the hooks only see embeddings. Methods whose options read
    it refuse to compress without it.
    """

    def __init__(self, policy: CachePolicy, num_layers: int, image: Tensor | None = None):
        super().__init__(layers=[CompressedLayer() for _ in range(num_layers)])
        self.policy = policy
        self.layer_policies = policy.layer_policies(num_layers)
        self.per_layer_masks = policy.layer_budgets is not None
        self.image = image
        self.seen: Tensor | None = None
        self.real: Tensor | None = None  # [B, S] the raw prompt's non-pad columns
        self.order: Tensor | None = None  # [B, S] those columns first, in order
        self.history: list[Tensor] = []  # lengths after each forward, one [layers, B] tensor per step

    @property
    def lengths(self) -> Tensor:
        return self.layers[0].lengths

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped")

    @property
    def prefilled(self) -> bool:
        return self.layers[0].compressed

    def get_query_offset(self, layer_idx: int = 0) -> int:
        # Queries sit right after the stored entries (never 0 once entries are stored).
        return self.layers[0].width if self.prefilled else 0

    def begin_prompt(self, real: Tensor) -> None:
        self.real, self.order = real, pack_order(real)
        self.seen = real.sum(1)

    def record_lengths(self) -> None:
        """After the prompt or a step: every layer's lengths, for the stats."""
        self.history.append(torch.stack([layer.lengths for layer in self.layers]))

    def begin_step(self) -> Tensor:
        """Advance one token; returns the first layer's decode mask [B, W+1] (`step_mask`)."""
        self.seen = self.seen + 1
        return self.layers[0].step_mask()

    def reset(self):
        raise NotImplementedError("use a fresh CompressedCache per generate call")
