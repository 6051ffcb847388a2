"""The caption actor as Ray Data runs it, and the per-actor counters the run's metrics report.

Ray Data calls an actor with up to `--batches-in-flight` batches at a time, each on its own
thread; `captions.Captions` shares one engine loop between them. This module imports no model
code, so the driver can define the actor pool without loading torch's and transformers' model
machinery: `Captioner` imports `captions` in the actor.
"""

import os
import threading
import time

import pyarrow as pa
import ray

from elastic_ray.pipeline.job import CaptionJob

OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()), ("caption", pa.string()), ("error", pa.string()),
    ("model", pa.string()), ("method", pa.string()), ("budget", pa.float64()),
    ("prompt_tokens", pa.int64()), ("output_tokens", pa.int64()), ("kv_bytes", pa.int64()),
    ("latency_ms", pa.float64()),
])


@ray.remote(num_cpus=0)
class ActorStats:
    """Per-actor counters the caption actors report to after each batch: sums, and the wall-clock
    times (time.time()) the actor was ready, first fed and last done."""

    def __init__(self):
        self.actors: dict[str, dict] = {}
        self.sampler: str | None = None  # the actor measuring the quality sample
        self.quality: dict | None = None  # what it measured

    def claim_sample(self, key: str) -> bool:
        """Whether actor `key` is to measure the quality sample: the first to ask is, and again after a restart."""
        if self.quality is None and self.sampler in (None, key):
            self.sampler = key
            return True
        return False

    def sample_measured(self, quality: dict) -> None:
        self.quality = quality

    def sample(self) -> dict | None:
        return self.quality

    def started(self, key: str, node: str, pid: int, load_s: float, ready_at: float, engine: dict) -> None:
        entry = self.actors.setdefault(key, {
            "node": node, "pid": pid, "starts": 0, "load_s": [], "ready_at": ready_at, "batches": 0, "rows": 0,
            "errors": 0, "prompt_tokens": 0, "output_tokens": 0, "kv_bytes": 0, "kv_bytes_full": 0,
            "intake_s": 0.0, "engine_s": 0.0, "wait_s": 0.0, "cpu_s": 0.0, "decode_steps": 0, "busy_slots": 0, "slot_steps": 0,
            "fed_at": None, "done_at": None})
        entry.update(node=node, pid=pid, **engine)
        entry["starts"] += 1
        entry["load_s"].append(round(load_s, 3))

    def batch(self, key: str, counts: dict, fed_at: float | None, done_at: float | None) -> None:
        entry = self.actors[key]
        entry["batches"] += 1
        for name, value in counts.items():
            entry[name] += value
        if fed_at is not None:
            entry["fed_at"] = min(fed_at, entry["fed_at"] or fed_at)
            entry["done_at"] = max(done_at, entry["done_at"] or done_at)

    def snapshot(self) -> dict:
        return self.actors


def measure_sample_apart(job: CaptionJob, requests: list[dict], score) -> dict:
    """The quality sample measured in a Ray task of its own (one caption actor's resources), for a
    run whose pipeline ended before the actor measuring it had finished (a small input)."""
    from elastic_ray.pipeline.captions import Captions
    from elastic_ray.pipeline.sample import measure_sample

    captions = Captions(job, max_engines=2)
    try:
        return measure_sample(captions.loop, captions.engine, captions.cache, captions.sampling, requests, score)
    finally:
        captions.close()


class Captioner:
    """The actor-pool callable: `Captions`, reporting to `ActorStats` after every batch its counts and
    what was measured since the last report: its engine loop's decode steps, busy slots, waiting
    and stepping, and the process's CPU time (all threads)."""

    def __init__(self, job: CaptionJob, stats, sample: list | None = None, score=None):
        """`sample` = [an object ref to the quality sample's requests] (nested, so only the actor
        that measures it fetches it) and `score(captions, references) -> dict`: the first actor
        to claim it measures it on a thread of its own (`sample.measure_sample`) and reports it."""
        from elastic_ray.pipeline.captions import Captions, engine_slots  # model code: in the actor only

        start = time.perf_counter()
        self.captions, self.stats = Captions(job, max_engines=2 if sample else 1), stats
        self.reported, self.cpu_reported, self.lock = self.captions.loop.stats(), time.process_time(), threading.Lock()
        context = ray.get_runtime_context()
        self.key = context.get_actor_id()
        ray.get(stats.started.remote(self.key, context.get_node_id(), os.getpid(), time.perf_counter() - start,
                                     time.time(), engine_slots(self.captions.engine)))
        if sample and ray.get(stats.claim_sample.remote(self.key)):
            threading.Thread(target=self._measure_sample, args=(sample[0], score), name="quality-sample",
                             daemon=True).start()

    def _measure_sample(self, requests, score) -> None:
        from elastic_ray.pipeline.sample import measure_sample

        c = self.captions
        quality = measure_sample(c.loop, c.engine, c.cache, c.sampling, ray.get(requests), score)
        ray.get(self.stats.sample_measured.remote(quality))

    def __call__(self, batch: pa.Table) -> pa.Table:
        table, numbers = self.captions(batch)
        fed_at, done_at = numbers.pop("fed_at"), numbers.pop("done_at")
        with self.lock:
            now, before, cpu_before = self.captions.loop.stats(), self.reported, self.cpu_reported
            self.reported, self.cpu_reported = now, time.process_time()
        numbers.update(cpu_s=self.cpu_reported - cpu_before, decode_steps=now.decode_steps - before.decode_steps,
                       busy_slots=now.busy_slots - before.busy_slots, slot_steps=now.slots - before.slots,
                       wait_s=now.wait_s - before.wait_s, engine_s=now.step_s - before.step_s)
        ray.get(self.stats.batch.remote(self.key, numbers, fed_at, done_at))
        return table
