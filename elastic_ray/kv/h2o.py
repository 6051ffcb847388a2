"""H2O (Zhang et al., NeurIPS 2023): heavy hitters by accumulated attention plus a recent window,
per KV head, with scores accumulated during decoding too."""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from elastic_ray.kv.entries import Selection, real_mask
from elastic_ray.kv.policy import CachePolicy


@dataclass(frozen=True)
class H2OCache(CachePolicy):
    recent_ratio: float = 0.5

    name = "h2o"
    prompt_scores = "kv"
    decode_scores = True

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.recent_ratio < 1.0:
            raise ValueError(f"recent_ratio must be in [0, 1), got {self.recent_ratio!r}")

    @property
    def reserved(self) -> int:
        return 1  # the newest entry is always in the recent window

    def recent(self, kept: Tensor) -> Tensor:
        """Size of the recent window for a cache that keeps `kept` entries: at least the newest."""
        return (kept.float() * self.recent_ratio).floor().long().clamp(min=1)

    def select_prompt(self, scores: Tensor | None, lengths: Tensor, **inputs) -> Selection:
        """scores [B, H, T]: attention each entry received, summed over the KV head's query heads."""
        batch, heads, width = scores.shape
        kept = self.kept_counts(lengths)
        recent = self.recent(kept)
        pos = torch.arange(width, device=scores.device)
        in_window = real_mask(lengths, width) & (pos[None, :] >= (lengths - recent)[:, None])
        older = real_mask(lengths, width) & ~in_window
        order = torch.sort(
            scores.float().masked_fill(~older[:, None, :], float("-inf")), dim=-1, descending=True, stable=True
        ).indices
        rank = torch.empty_like(order).scatter_(-1, order, pos.expand(batch, heads, width))
        heavy = older[:, None, :] & (rank < (kept - recent)[:, None, None])
        return Selection(keep=heavy | in_window[:, None, :])

    def victims(self, scores: Tensor | None, cache_lens: Tensor, truncation: Tensor, heads: int) -> Tensor:
        """The least-attended entry outside the recent window, per KV head (ties: the oldest)."""
        width = scores.shape[-1]
        recent = self.recent(cache_lens - 1)
        eligible = torch.arange(width, device=scores.device)[None, :] < (cache_lens - recent)[:, None]
        return scores.float().masked_fill(~eligible[:, None, :], math.inf).argmin(dim=-1)
