"""One thread that owns a pool of engines and steps them while work is pending, so work
submitted from any thread (request coroutines, a caption actor's batches) shares decode steps.
Free of Ray: the Serve replica and the caption actor both run one."""

import logging
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, replace
from typing import Callable

from elastic_ray.config import CacheConfig, SamplingParams
from elastic_ray.engine.engine import Engine
from elastic_ray.models.prompts import PreparedRequest
from elastic_ray.outputs import RequestOutput

logger = logging.getLogger(__name__)


class Refused(ValueError):
    """Work the loop cannot run: `field` is "cache" (no engine for its policy) or "request"
    (the engine refused the request)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class LoopStopped(RuntimeError):
    """The loop is closed, or stopped after a failure; nothing more runs."""


class EngineFailed(RuntimeError):
    """A step failed in a way that leaves the engine's state unknown; the loop stopped."""


class RequestFailed(RuntimeError):
    """One submission's work failed, and it alone; the loop goes on. Either it could not start (an
    unexpected error, not a refusal), or the engine finished it with finish_reason "error" (its
    prefill failed): then `output` is that RequestOutput, with the reason."""

    def __init__(self, message: str, output: RequestOutput | None = None):
        super().__init__(message)
        self.output = output


def start_failure(error: Exception, field: str, context: str = "") -> Exception:
    """What a submission gets when its engine cannot be made or its request not added: a
    ValueError refuses the work (`field` as in Refused), anything else fails that work alone."""
    if isinstance(error, ValueError):
        return Refused(f"{context}{error}", field)
    logger.error("starting a request failed", exc_info=error)
    return RequestFailed(f"the request could not start: {type(error).__name__}: {error}")


@dataclass(frozen=True)
class Work:
    """A request as the engine takes it, with its sampling and cache policy."""

    request: dict | PreparedRequest
    sampling: SamplingParams
    cache: CacheConfig


@dataclass(eq=False)
class Submission:
    """Work for the loop; `deliver` receives each RequestOutput (only the finished one unless
    `stream`), or one of this module's exceptions."""

    work: Work
    deliver: Callable[[RequestOutput | Exception], None]
    stream: bool = True


@dataclass
class LoopStats:
    """What the loop measured. Occupancy is `busy_slots / slots`: the running sequences of every
    decode step over the slots of the engine it stepped, both summed over decode steps.
    `wait_s` is the time the loop sat with nothing to run, from its first submission on, counting
    only waits that new work ended (not the idle time after the last work, nor a wait ended by close).
    `step_s` is the time spent in the engines' steps."""

    decode_steps: int = 0
    busy_slots: int = 0
    slots: int = 0
    wait_s: float = 0.0
    step_s: float = 0.0

    @property
    def occupancy(self) -> float | None:
        return self.busy_slots / self.slots if self.slots else None


class EngineLoop:
    """The one thread that calls the pool's engines (an engine is not thread-safe).

    `submit` queues work from any thread and `cancel` withdraws it (a client gone). Each round
    the loop first aborts cancelled work, then adds new work to the engine for its cache
    policy, made on first use; with `max_engines` engines already, the least recently used idle
    one is dropped first, and work waits while every engine is busy. An engine holds at most
    `max_pending` requests (running and queued in it; None: no limit), so the rest wait in the
    loop, where cancelling them costs nothing. Then it steps each engine with unfinished
    requests once and delivers the outputs; a request the engine failed alone (finish_reason
    "error") gets `RequestFailed`.

    A failure to make an engine or to add a request reaches that submission alone (`Refused`
    or `RequestFailed`): `Engine.add_request` queues the request as its last act, so a request
    that raised left no trace. An exception from a step is a bug or a device fault that leaves
    the engine's state unknown: every pending submission gets `EngineFailed`, the loop stops and
    `error` stays set.
    """

    def __init__(self, make_engine: Callable[[CacheConfig], Engine], max_engines: int, first: CacheConfig,
                 max_pending: int | None = None):
        self.make_engine, self.max_engines, self.max_pending = make_engine, max_engines, max_pending
        self.engines: OrderedDict[CacheConfig, Engine] = OrderedDict({first: make_engine(first)})
        self.error: BaseException | None = None
        self._inbox: list[Submission] = []
        self._cancelled: list[Submission] = []
        self._waiting: list[Submission] = []
        self._running: dict[tuple[CacheConfig, int], Submission] = {}
        self._pending: Counter[CacheConfig] = Counter()  # requests each engine holds
        self._stats = LoopStats()
        self._started = False  # a first submission has arrived: waiting from now on counts
        self._lock = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(self, submission: Submission) -> None:
        self.submit_all([submission])

    def submit_all(self, submissions: list[Submission]) -> None:
        """Submit several at once: the loop's next round sees them all."""
        with self._lock:
            if self.error is not None or self._closed:
                for submission in submissions:
                    submission.deliver(LoopStopped("the engine loop has stopped"))
                return
            self._inbox += submissions
            self._started = True
            self._lock.notify()

    def cancel(self, submission: Submission) -> None:
        with self._lock:
            self._cancelled.append(submission)
            self._lock.notify()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()

    def release(self, cache: CacheConfig) -> bool:
        """Drop the idle engine for `cache`, freeing its KV memory, unless it is the pool's last;
        returns whether it was dropped."""
        with self._lock:
            engine = self.engines.get(cache)
            if engine is None or engine.has_unfinished() or len(self.engines) == 1:
                return False
            del self.engines[cache]
            return True

    def stats(self) -> LoopStats:
        """A copy of what the loop has measured so far."""
        with self._lock:
            return replace(self._stats)

    def describe(self) -> list[dict]:
        with self._lock:
            engines = list(self.engines.items())
        return [{"method": cache.method, "budget": cache.budget, "options": cache.options, "slots": engine.num_slots,
                 "slot_bytes": engine.slot_bytes, "kv_allocated_bytes": engine.kv_allocated_bytes,
                 "aborted": engine.aborted}
                for cache, engine in engines]

    def _run(self) -> None:
        try:
            while self._round():
                pass
        except Exception as e:
            with self._lock:
                self.error = e
                pending = self._inbox + self._waiting + list(self._running.values())
            for submission in pending:
                submission.deliver(EngineFailed(f"the engine failed: {type(e).__name__}: {e}"))
            logger.exception("the engine loop stopped")

    def _round(self) -> bool:
        with self._lock:
            if not self._has_work():
                idle_since, counted = time.perf_counter(), self._started
                while not self._has_work():
                    self._lock.wait()
                if counted and not self._closed:
                    self._stats.wait_s += time.perf_counter() - idle_since
            if self._closed:
                return False
            self._waiting += self._inbox
            self._inbox, cancelled = [], self._cancelled
            self._cancelled = []
        self._abort(cancelled)
        self._admit()
        for cache, engine in list(self.engines.items()):
            if engine.has_unfinished():
                self._step(cache, engine)
        return True

    def _step(self, cache: CacheConfig, engine: Engine) -> None:
        decodes, busy, start = engine.steps["decode"], engine.busy_slot_steps, time.perf_counter()
        outputs = engine.step()
        with self._lock:
            self._stats.step_s += time.perf_counter() - start
            if engine.steps["decode"] > decodes:
                self._stats.decode_steps += 1
                self._stats.busy_slots += engine.busy_slot_steps - busy
                self._stats.slots += engine.num_slots
        for output in outputs:
            key = (cache, output.request_id)
            submission = self._running.pop(key) if output.finished else self._running[key]
            if output.finished:
                self._pending[cache] -= 1
            if output.finish_reason == "error":
                submission.deliver(RequestFailed(f"the request failed: {output.error}", output))
            elif output.finished or submission.stream:
                submission.deliver(output)

    def _has_work(self) -> bool:
        return bool(self._inbox or self._waiting or self._running or self._cancelled or self._closed)

    def _abort(self, cancelled: list[Submission]) -> None:
        """Withdraw cancelled work: a waiting submission is dropped, a running one aborted in its engine."""
        gone = {id(s) for s in cancelled}
        self._waiting = [s for s in self._waiting if id(s) not in gone]
        for (cache, request_id), submission in list(self._running.items()):
            if id(submission) in gone:
                del self._running[cache, request_id]
                self._pending[cache] -= 1
                self.engines[cache].abort(request_id)

    def _admit(self) -> None:
        """Add waiting work to engines in arrival order. Work whose policy has no engine while the
        pool is full and busy waits, and so does later work for the least recently used engine,
        which thus drains and makes room; so does work for an engine holding `max_pending`."""
        waiting, self._waiting = self._waiting, []
        draining = None
        for submission in waiting:
            work = submission.work
            if work.cache not in self.engines and not self._room():
                draining = draining or next(iter(self.engines))
            full = self.max_pending is not None and self._pending[work.cache] >= self.max_pending
            if full or work.cache == draining or (work.cache not in self.engines and draining is not None):
                self._waiting.append(submission)
                continue
            try:
                engine = self._engine(work.cache)
            except Exception as e:
                submission.deliver(start_failure(e, "cache", f"cannot run {work.cache}: "))
                continue
            try:
                request_id = engine.add_request(work.request, work.sampling)
            except Exception as e:
                submission.deliver(start_failure(e, "request"))
                continue
            self._running[work.cache, request_id] = submission
            self._pending[work.cache] += 1

    def _room(self) -> bool:
        """Whether the pool can take another engine, after dropping its least recently used idle one."""
        with self._lock:
            if len(self.engines) < self.max_engines:
                return True
            idle = next((c for c, e in self.engines.items() if not e.has_unfinished()), None)
            if idle is not None:
                del self.engines[idle]
            return idle is not None

    def _engine(self, cache: CacheConfig) -> Engine:
        with self._lock:
            if cache in self.engines:
                self.engines.move_to_end(cache)
                return self.engines[cache]
        engine = self.make_engine(cache)
        with self._lock:
            self.engines[cache] = engine
        return engine
