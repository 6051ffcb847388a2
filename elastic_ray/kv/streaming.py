"""StreamingLLM (Xiao et al., 2024): attention sinks plus a window of the most recent entries."""

from dataclasses import dataclass

import torch
from torch import Tensor

from elastic_ray.kv.entries import Selection
from elastic_ray.kv.policy import CachePolicy, keep_first_and_last


@dataclass(frozen=True)
class StreamingCache(CachePolicy):
    sink: int = 4

    name = "streaming"

    @property
    def reserved(self) -> int:
        return self.sink + 1  # the sinks and the newest entry

    def select_prompt(self, scores: Tensor | None, lengths: Tensor, **inputs) -> Selection:
        recent = self.kept_counts(lengths) - self.sink
        return Selection(keep=keep_first_and_last(lengths, int(lengths.max()), self.sink, recent.clamp(min=0)))

    def truncation_points(self, kept: Tensor) -> Tensor:
        # The window is a FIFO that starts right after the sinks.
        return torch.full_like(kept, self.sink)
