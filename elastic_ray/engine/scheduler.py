"""Which sequences run: admit waiting ones while slots are free, retire finished ones."""

from collections import deque

from elastic_ray.engine.sequence import Sequence, Status


class Scheduler:
    """First come, first served over `num_slots` slots; running[i] always owns slot i."""

    def __init__(self, num_slots: int, max_prefill_tokens: int):
        self.num_slots, self.max_prefill_tokens = num_slots, max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id) -> Sequence | None:
        """The unfinished sequence of `request_id`; a waiting one is taken off the queue (a running
        one stays in its slot for `retire`)."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.status = Status.FINISHED
                return seq
        return next((seq for seq in self.running if seq.request_id == request_id), None)

    def admit(self) -> list[Sequence]:
        """Waiting sequences given the next free slots, within one prefill's token bound."""
        admitted, tokens = [], 0
        while self.waiting and len(self.running) < self.num_slots:
            seq = self.waiting[0]
            if admitted and tokens + seq.prompt_tokens > self.max_prefill_tokens:
                break
            self.waiting.popleft()
            seq.status, seq.slot = Status.RUNNING, len(self.running)
            self.running.append(seq)
            admitted.append(seq)
            tokens += seq.prompt_tokens
        return admitted

    def retire(self, finished: list[Sequence]) -> list[tuple[int, int]]:
        """Free the finished sequences' slots; returns the (source, target) slot moves that keep
        the busy slots contiguous."""
        moves = []
        for seq in sorted(finished, key=lambda s: s.slot, reverse=True):
            last = self.running.pop()
            if last is not seq:
                moves.append((last.slot, seq.slot))
                last.slot = seq.slot
                self.running[seq.slot] = last
            seq.status, seq.slot = Status.FINISHED, -1
        return moves
