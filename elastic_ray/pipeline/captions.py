"""The caption step of an actor: one engine loop fed by several batches at once.

Every batch hands its rows to the actor's one `EngineLoop`, so the rows of all batches share the
engine's slots: when one batch's last rows run, the next batch's rows already fill the free
slots. A batch returns as soon as its own rows are done.
"""

import math
import threading
import time

import pyarrow as pa
from transformers.utils import logging as transformers_logging

from elastic_ray.config import CacheConfig, EngineConfig, SamplingParams
from elastic_ray.engine.engine import Engine
from elastic_ray.engine.loop import EngineLoop, Refused, RequestFailed, Submission, Work
from elastic_ray.models.loading import load
from elastic_ray.outputs import RequestOutput
from elastic_ray.pipeline.actor import OUTPUT_SCHEMA
from elastic_ray.pipeline.job import CaptionJob
from elastic_ray.pipeline.prepare import unpack

# Requests an engine holds (running and queued in it) per slot, as ray.data.llm caps vLLM's: one
# more than its slots is enough for every freed slot to be refilled at the next step.
PENDING_PER_SLOT = 1.1


def load_model(job: CaptionJob):
    """The job's (model, processor), on the GPU when its actors have one; no progress bar in the run's log."""
    transformers_logging.disable_progress_bar()
    return load(job.model, device="cuda" if job.gpus_per_actor > 0 else None)


def cache_config(job: CaptionJob) -> CacheConfig:
    return CacheConfig(job.method, job.budget, **dict(job.cache_options))


def engine_config(job: CaptionJob) -> EngineConfig:
    """`max_num_seqs` sequences in flight in `kv_cache_memory`, prompts up to what the context leaves."""
    return EngineConfig(kv_cache_memory=job.kv_cache_memory, max_num_seqs=job.max_num_seqs, max_tokens=job.max_tokens)


def build_engine(job: CaptionJob, model=None) -> Engine:
    """The job's engine, on `model` = (model, processor) or the job's model loaded."""
    return Engine(*(model or load_model(job)), cache_config(job).policy, engine_config(job))


def engine_slots(engine: Engine) -> dict:
    """What an actor's engine packs: its slots, and the slots its KV budget would hold with a full cache."""
    return {"slots": engine.num_slots, "slot_bytes": engine.slot_bytes,
            "full_slots": engine.slots_for(CacheConfig("full", 1.0).policy), "kv_budget_bytes": engine.kv_budget_bytes}


def sampling(job: CaptionJob) -> SamplingParams:
    return SamplingParams(max_tokens=job.max_tokens, temperature=0.0)


class BatchResult:
    """One batch's output rows, filled in by the engine loop's thread as its rows finish."""

    def __init__(self, job: CaptionJob, rows: list[dict], pending: int):
        self.start, self.left, self.done, self.failure, self.kv_bytes_full = time.perf_counter(), pending, \
            threading.Event(), None, 0
        self.rows = [{"id": r["id"], "caption": None, "error": r["error"], "model": job.model, "method": job.method,
                      "budget": float(job.budget), "prompt_tokens": None, "output_tokens": None, "kv_bytes": None,
                      "latency_ms": None} for r in rows]
        if not pending:
            self.done.set()

    def receiver(self, i: int):
        def receive(event: RequestOutput | Exception) -> None:
            row = self.rows[i]
            if isinstance(event, Refused):
                row["error"] = f"refused by the engine: {event}"
            elif isinstance(event, RequestFailed):  # this row alone could not start, or its prefill failed
                row["error"] = str(event)
            elif isinstance(event, Exception):  # the loop stopped: the batch fails
                self.failure = event
            else:
                row.update(caption=event.text, prompt_tokens=event.stats["prompt_tokens"],
                           output_tokens=event.stats["output_tokens"], kv_bytes=event.stats["kv_bytes"],
                           latency_ms=round(1000 * (time.perf_counter() - self.start), 3))
                self.kv_bytes_full += event.stats["kv_bytes_full"]
            self.left -= 1
            if not self.left:
                self.done.set()
        return receive


class Captions:
    """One engine loop and the caption step for processed batches (`prepare.process`), called from
    any number of threads at once. Rows the CPU stages flagged keep their error; a request the
    engine refuses becomes its row's error while the rest run."""

    def __init__(self, job: CaptionJob, max_engines: int = 1):
        """`max_engines` 2 leaves room for the quality sample's full-cache engine beside the job's."""
        self.job, self.cache, self.sampling = job, cache_config(job), sampling(job)
        self.model = load_model(job)
        self.engine = build_engine(job, self.model)
        config = engine_config(job)

        def make_engine(cache: CacheConfig) -> Engine:
            return self.engine if cache == self.cache else Engine(*self.model, cache.policy, config)

        self.loop = EngineLoop(make_engine, max_engines, self.cache,
                               max_pending=math.ceil(PENDING_PER_SLOT * self.engine.num_slots))

    def close(self) -> None:
        """Stop the engine loop's thread."""
        self.loop.close()

    def __call__(self, batch: pa.Table) -> tuple[pa.Table, dict]:
        """The output rows, and the batch's numbers for the run's per-actor metrics: counts, and
        `fed_at` / `done_at`, when its rows reached the loop and its last one finished (None
        when no row did)."""
        rows = batch.to_pylist()
        pending = [i for i, row in enumerate(rows) if row["error"] is None]
        result = BatchResult(self.job, rows, len(pending))
        submissions = [Submission(Work(unpack(rows[i]), self.sampling, self.cache), result.receiver(i), stream=False)
                       for i in pending]
        intake_s, fed_at = time.perf_counter() - result.start, time.time() if pending else None
        self.loop.submit_all(submissions)
        result.done.wait()
        if result.failure is not None:
            raise result.failure
        captioned = [r for r in result.rows if r["caption"] is not None]
        numbers = {
            "rows": len(rows), "errors": len(rows) - len(captioned), "intake_s": intake_s,
            "kv_bytes_full": result.kv_bytes_full, "prompt_tokens": sum(r["prompt_tokens"] for r in captioned),
            "output_tokens": sum(r["output_tokens"] for r in captioned), "kv_bytes": sum(r["kv_bytes"] for r in captioned),
            "fed_at": fed_at, "done_at": time.time() if pending else None,
        }
        return pa.Table.from_pylist(result.rows, schema=OUTPUT_SCHEMA), numbers
