"""One request's state inside the engine."""

from dataclasses import dataclass, field
from enum import Enum

import torch

from elastic_ray.config import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request from admission to its last token. `inputs` are its processor tensors (batch 1)."""

    request_id: int | str
    inputs: dict[str, torch.Tensor]
    prompt_tokens: int
    sampling: SamplingParams
    status: Status = Status.WAITING
    slot: int = -1
    generated: list[int] = field(default_factory=list)
    kv_entries_prompt: int = 0
    generator: torch.Generator | None = None
    forced: list[int] | None = None  # teacher forcing: feed these tokens and score them
    logprobs: list[float] = field(default_factory=list)  # log-probability of each forced token

    @property
    def last_token(self) -> int:
        return self.generated[-1]
