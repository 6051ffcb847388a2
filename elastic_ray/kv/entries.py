"""Batched prompt entries and the keep/merge step every method ends with."""

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Selection:
    """What to keep of one layer's prompt. G is 1 (shared by all heads) or the number of KV heads.

    keep:    [B, G, T] bool, the entries that stay.
    targets: [B, G, T] long or None; the kept entry each one is averaged into
             (a kept entry targets itself, -1 means dropped without merging).
    """

    keep: Tensor
    targets: Tensor | None = None


@dataclass
class CompressedEntries:
    """One layer's entries after the prompt stage; row b's entries are packed in [0, lengths[b]).

    keys/values: [B, H, C, D]; positions: [B, H, C] original prompt positions, -1 past the end.
    """

    keys: Tensor
    values: Tensor
    lengths: Tensor
    positions: Tensor


def real_mask(lengths: Tensor, width: int) -> Tensor:
    """[B, width] bool, True for the first `lengths[b]` entries of each row."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def pack_order(real: Tensor) -> Tensor:
    """[B, S] column order that puts each row's real columns first, in their original order."""
    return torch.sort((~real).to(torch.int8), dim=1, stable=True).indices


def apply_selection(keys: Tensor, values: Tensor, selection: Selection) -> CompressedEntries:
    """Merge dropped entries into their targets (uniform mean), then pack the kept ones to the left."""
    batch, heads, width, dim = keys.shape
    keep = selection.keep.expand(batch, heads, width)
    if selection.targets is not None:
        keys, values = _merge(keys, values, selection.targets.expand(batch, heads, width))
    lengths = keep[:, 0].sum(-1)
    kept_width = int(lengths.max()) if batch else 0
    order = pack_order(keep.reshape(batch * heads, width)).view(batch, heads, width)[..., :kept_width]
    index = order.unsqueeze(-1).expand(batch, heads, kept_width, dim)
    positions = torch.where(real_mask(lengths, kept_width)[:, None, :], order, -1)
    return CompressedEntries(keys.gather(2, index), values.gather(2, index), lengths, positions)


def _merge(keys: Tensor, values: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Replace every target by the float32 mean of itself and the entries that point at it."""
    member = targets >= 0
    index = targets.clamp(min=0)
    counts = torch.zeros(targets.shape, dtype=torch.float32, device=keys.device)
    counts.scatter_add_(2, index, member.float())
    is_target = counts > 0
    merged = []
    for states in (keys, values):
        weighted = states.float() * member.unsqueeze(-1)
        sums = torch.zeros_like(weighted).scatter_add_(2, index.unsqueeze(-1).expand_as(weighted), weighted)
        mean = (sums / counts.clamp(min=1).unsqueeze(-1)).to(states.dtype)
        merged.append(torch.where(is_target.unsqueeze(-1), mean, states))
    return merged[0], merged[1]
