"""One request's state inside the engine."""

from dataclasses import dataclass, field
from enum import Enum

import torch

from elastic_ray.config import SamplingParams
from elastic_ray.engine.detokenizer import IncrementalText
from elastic_ray.kv.budget import over_budget
from elastic_ray.kv.policy import CachePolicy


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request from admission to its last token. `inputs` are its processor tensors (batch 1).

    The KV counts mirror, on the host, what the device's slot holds for it (the same §10
    arithmetic, so reading them costs no sync): `kv_entries` stored, `kv_columns` in use (one more
    while the column of the last eviction waits for the next entry).

    `drawn` counts the tokens sampled on the device, `generated` those read back on the host: with
    async output the host is a step behind. `ended`: its finished output went out, or it was
    aborted; a token still drawn for it (in the step launched before the host knew) is discarded.
    """

    request_id: int | str
    inputs: dict[str, torch.Tensor]
    prompt_tokens: int
    sampling: SamplingParams
    status: Status = Status.WAITING
    slot: int = -1
    generated: list[int] = field(default_factory=list)
    drawn: int = 0
    ended: bool = False
    kv_entries_prompt: int = 0
    kv_entries: int = 0
    kv_columns: int = 0
    generator: torch.Generator | None = None
    forced: list[int] | None = None  # teacher forcing: feed these tokens and score them
    logprobs: list[float] = field(default_factory=list)  # log-probability of each forced token
    text: IncrementalText | None = None
    eos: set[int] = field(default_factory=set)  # tokens that end it (empty with ignore_eos)

    def prompt_stored(self, policy: CachePolicy) -> None:
        """The prompt stage kept C0 entries in columns [0, C0)."""
        self.kv_entries_prompt = self.kv_entries = self.kv_columns = policy.prompt_kept(self.prompt_tokens)

    def columns_next_step(self) -> int:
        """Columns in use once the next step has written its entry."""
        return self.kv_columns + (self.kv_columns == self.kv_entries)

    def token_fed(self, policy: CachePolicy) -> None:
        """One decode step fed this sequence's last token: its entry is written, then maybe one evicted."""
        self.kv_columns = self.columns_next_step()
        self.kv_entries += 1
        seen = self.prompt_tokens + self.drawn  # the token just fed included
        if policy.evicts and over_budget(self.kv_entries, seen, policy.budget):
            self.kv_entries -= 1
