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

    The KV counts mirror, on the host, what the device's slot holds for it in each layer (the same
    §10 arithmetic with each layer's policy, so reading them costs no sync): `kv_entries[l]` stored,
    `kv_columns[l]` in use (one more while the column of the last eviction waits for the next entry).

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
    kv_entries_prompt: list[int] = field(default_factory=list)
    kv_entries: list[int] = field(default_factory=list)
    kv_columns: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    forced: list[int] | None = None  # teacher forcing: feed these tokens and score them
    logprobs: list[float] = field(default_factory=list)  # log-probability of each forced token
    text: IncrementalText | None = None
    eos: set[int] = field(default_factory=set)  # tokens that end it (empty with ignore_eos)

    def prompt_stored(self, layers: list[CachePolicy]) -> None:
        """The prompt stage kept C0 entries in columns [0, C0) of each layer (`layers`: their policies)."""
        self.kv_entries_prompt = [policy.prompt_kept(self.prompt_tokens) for policy in layers]
        self.kv_entries, self.kv_columns = list(self.kv_entries_prompt), list(self.kv_entries_prompt)

    def columns_next_step(self) -> int:
        """Columns in use in its widest layer once the next step has written its entry."""
        return max(columns + (columns == entries) for columns, entries in zip(self.kv_columns, self.kv_entries))

    def token_fed(self, layers: list[CachePolicy]) -> None:
        """One decode step fed this sequence's last token: in each layer its entry is written, then
        maybe one evicted."""
        seen = self.prompt_tokens + self.drawn  # the token just fed included
        for layer, policy in enumerate(layers):
            self.kv_columns[layer] += self.kv_columns[layer] == self.kv_entries[layer]
            self.kv_entries[layer] += 1
            if policy.evicts and over_budget(self.kv_entries[layer], seen, policy.budget):
                self.kv_entries[layer] -= 1
