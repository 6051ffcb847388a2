"""Sampled tokens on their way to the host: the copy starts when they are drawn, the host reads it
when it needs them (with async output, after the next step has been launched).

On CUDA the copy runs without blocking into a pinned host buffer and an event marks its end, so
the host waits only if it reads before the device got there. On the CPU the tokens are computed
on the host thread anyway (pinned memory needs CUDA): the copy is a plain one.
"""

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Copy:
    """One sampled group's values on the host, `[2, n]` float64: tokens, then log-probabilities."""

    values: Tensor
    with_logprobs: bool
    done: "torch.cuda.Event | None"

    def read(self) -> tuple[list[int], list[float] | None]:
        """The tokens and (teacher-forced rows only) their log-probabilities: the step's one read."""
        if self.done is not None:
            self.done.synchronize()
        if not self.with_logprobs:
            return [int(t) for t in self.values[0].tolist()], None
        tokens, logprobs = self.values.tolist()
        return [int(t) for t in tokens], logprobs


class Readback:
    """Host buffers `[2, 2, slots]` float64 (ids < 2^53 are exact): two, since the copy of step N+1
    is started before the host reads step N's. A group writes its own slots' rows, so the groups
    of one step (a prefill split after a failure) share a buffer; `flip` moves to the next step's."""

    def __init__(self, num_slots: int, device: torch.device):
        self.cuda = device.type == "cuda"
        self.buffers = torch.zeros(2, 2, num_slots, dtype=torch.float64, pin_memory=self.cuda)
        self.current = 0

    def flip(self) -> None:
        self.current ^= 1

    def start(self, first: int, tokens: Tensor, logprobs: Tensor | None) -> Copy:
        """Start copying the tokens (and log-probabilities) of slots [first, first + n) to the host."""
        values = self.buffers[self.current, :, first : first + len(tokens)]
        values[0].copy_(tokens.double(), non_blocking=self.cuda)
        if logprobs is not None:
            values[1].copy_(logprobs.double(), non_blocking=self.cuda)
        done = None
        if self.cuda:
            done = torch.cuda.Event()
            done.record()
        return Copy(values, logprobs is not None, done)
