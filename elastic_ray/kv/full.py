"""The full cache: keeps every entry. The reference point for every quality figure."""

from dataclasses import dataclass

from torch import Tensor

from elastic_ray.kv.entries import Selection, real_mask
from elastic_ray.kv.policy import CachePolicy


@dataclass(frozen=True)
class FullCache(CachePolicy):
    name = "full"

    def __post_init__(self):
        if self.budget != 1.0:
            raise ValueError(f"method 'full' keeps every entry: budget must be 1.0, got {self.budget!r}")
        super().__post_init__()

    def select_prompt(self, scores: Tensor | None, lengths: Tensor, **inputs) -> Selection:
        width = int(lengths.max())
        return Selection(keep=real_mask(lengths, width)[:, None, :])

