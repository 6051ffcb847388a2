"""Elastic Cache (Liu et al., ECCV 2024): importance-driven anchors with merging after the prompt,
fixed-point eviction during generation. Spec: shared/spec/elastic-cache.md §3, §4, §10."""

from dataclasses import dataclass

import torch
from torch import Tensor

from elastic_ray.kv.budget import prompt_kept
from elastic_ray.kv.entries import Selection
from elastic_ray.kv.policy import CachePolicy

POSITIONS = ("original", "compact")


def compress_prompt(
    keys: Tensor, values: Tensor, scores: Tensor, budget: float, *, sink: int = 1, protect: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """The prompt stage for one sequence and one layer, exactly as spec §10 states it.

    keys/values: [heads, T, head_dim]; scores: [T]. Returns the compressed keys and values and
    `kept`, the ascending original positions of the kept entries. Nothing removed -> the same tensors.
    """
    length = keys.shape[1]
    kept_len = prompt_kept(length, budget, sink + protect)
    if kept_len == length:
        return keys, values, torch.arange(length, device=keys.device)
    candidates = list(range(sink, length - protect))
    by_score = sorted(candidates, key=lambda t: (-float(scores[t]), t))
    anchors = sorted(by_score[: kept_len - sink - protect])
    keys, values = keys.clone(), values.clone()
    if anchors:
        members = {a: [a] for a in anchors}
        for t in candidates:
            if t not in members:
                members[min(anchors, key=lambda a: (abs(t - a), a))].append(t)
        for anchor, group in members.items():
            keys[:, anchor] = keys[:, group].float().sum(1).div(len(group)).to(keys.dtype)
            values[:, anchor] = values[:, group].float().sum(1).div(len(group)).to(values.dtype)
    kept = torch.tensor(list(range(sink)) + anchors + list(range(length - protect, length)), device=keys.device)
    return keys[:, kept], values[:, kept], kept


@dataclass(frozen=True)
class ElasticCache(CachePolicy):
    sink: int = 1
    protect: int = 1
    offset: int = 25
    merge: bool = True
    positions: str = "original"

    name = "elastic"
    prompt_scores = "mean"
    positions_modes = POSITIONS

    def __post_init__(self):
        super().__post_init__()
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.sink < 0 or self.protect < 0:
            raise ValueError(f"sink and protect must be >= 0, got {self.sink!r}, {self.protect!r}")
        if self.offset < 1:
            raise ValueError(f"offset must be >= 1, got {self.offset!r}")

    @property
    def reserved(self) -> int:
        return self.sink + self.protect

    def truncation_points(self, kept: Tensor) -> Tensor:
        return (kept - self.offset).clamp(min=self.sink)

    def select_prompt(self, scores: Tensor | None, lengths: Tensor) -> Selection:
        """Vectorised §3 over a batch; scores [B, T] (mean over query heads) at packed positions."""
        batch, width = scores.shape
        pos = torch.arange(width, device=scores.device)[None, :].expand(batch, width)
        ends = lengths[:, None]
        candidate = (pos >= self.sink) & (pos < ends - self.protect)
        protected = (pos < ends) & ~candidate
        num_anchors = (self.kept_counts(lengths) - self.reserved).clamp(min=0)
        # Stable descending sort: equal scores keep the lower position first.
        order = torch.sort(scores.float().masked_fill(~candidate, float("-inf")), dim=1, descending=True, stable=True)
        rank = torch.empty_like(order.indices).scatter_(1, order.indices, pos)
        anchor = candidate & (rank < num_anchors[:, None])
        keep = protected | anchor
        if not self.merge:
            return Selection(keep=keep[:, None, :])
        return Selection(keep=keep[:, None, :], targets=_nearest_anchor(anchor, candidate, pos)[:, None, :])


def _nearest_anchor(anchor: Tensor, candidate: Tensor, pos: Tensor) -> Tensor:
    """[B, T] the anchor each candidate joins (nearest by position, ties to the earlier); -1 if none."""
    width = pos.shape[1]
    previous = torch.where(anchor, pos, -1).cummax(dim=1).values
    following = torch.where(anchor, pos, 2 * width).flip(1).cummin(dim=1).values.flip(1)
    has_previous, has_following = previous >= 0, following < 2 * width
    take_previous = has_previous & (~has_following | (pos - previous <= following - pos))
    target = torch.where(take_previous, previous, following)
    joins = candidate & (has_previous | has_following)
    return torch.where(anchor, pos, torch.where(joins, target, -1))
