"""The caption actor: one `LLM` per actor, the caption step for a prepared batch, and the per-actor
counters the run's metrics report."""

import os
import time

import pyarrow as pa
import ray

from elastic_ray import LLM, CacheConfig, EngineConfig, SamplingParams
from elastic_ray.models.loading import load
from elastic_ray.pipeline.job import CaptionJob
from elastic_ray.pipeline.prepare import to_request

OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()), ("caption", pa.string()), ("error", pa.string()),
    ("model", pa.string()), ("method", pa.string()), ("budget", pa.float64()),
    ("prompt_tokens", pa.int64()), ("output_tokens", pa.int64()), ("kv_bytes", pa.int64()),
    ("latency_ms", pa.float64()),
])


@ray.remote(num_cpus=0)
class ActorStats:
    """Per-actor counters the caption actors report to after each batch."""

    def __init__(self):
        self.actors: dict[str, dict] = {}

    def started(self, key: str, node: str, pid: int, load_s: float, engine: dict) -> None:
        entry = self.actors.setdefault(key, {"node": node, "pid": pid, "starts": 0, "load_s": [], "batches": 0,
                                             "rows": 0, "errors": 0, "prompt_tokens": 0, "output_tokens": 0,
                                             "kv_bytes": 0, "kv_bytes_full": 0, "engine_s": 0.0})
        entry.update(node=node, pid=pid, **engine)
        entry["starts"] += 1
        entry["load_s"].append(round(load_s, 3))

    def batch(self, key: str, numbers: dict) -> None:
        entry = self.actors[key]
        entry["batches"] += 1
        for name, value in numbers.items():
            entry[name] += value

    def snapshot(self) -> dict:
        return self.actors


def load_model(job: CaptionJob):
    """The job's (model, processor), on the GPU when its actors have one."""
    return load(job.model, device="cuda" if job.gpus_per_actor > 0 else None)


def build_llm(job: CaptionJob) -> LLM:
    """The job's engine: `max_num_seqs` sequences in flight, prompts up to what the context leaves.

    A batch of more rows than slots keeps the slots full (a finished row's slot takes the next
    row), so only each batch's last rows run with slots idle."""
    engine = EngineConfig(kv_cache_memory=job.kv_cache_memory, max_num_seqs=job.max_num_seqs, max_tokens=job.max_tokens)
    return LLM(load_model(job), cache=CacheConfig(job.method, job.budget, **dict(job.cache_options)), engine=engine)


def engine_slots(llm: LLM) -> dict:
    """What an actor's engine packs: its slots, and the slots its KV budget would hold with a full cache."""
    engine = llm.engine
    return {"slots": engine.num_slots, "slot_bytes": engine.slot_size * engine.entry_bytes,
            "full_slots": engine.slots_for(CacheConfig("full", 1.0).policy), "kv_budget_bytes": engine.kv_budget_bytes}


def sampling(job: CaptionJob) -> SamplingParams:
    return SamplingParams(max_tokens=job.max_tokens, temperature=0.0)


class Captions:
    """One `LLM` and the caption step for a prepared batch. Rows `prepare` flagged keep their error;
    the others go to the engine one by one, so a request it refuses (a prompt over its limit, say)
    becomes that row's error while the rest run batched."""

    def __init__(self, job: CaptionJob):
        self.job, self.llm = job, build_llm(job)
        self.sampling = sampling(job)

    def __call__(self, batch: pa.Table) -> tuple[pa.Table, dict]:
        """The output rows, and the batch's numbers for the run's per-actor metrics."""
        rows = batch.to_pylist()
        out = [{"id": r["id"], "caption": None, "error": r["error"], "model": self.job.model,
                "method": self.job.method, "budget": float(self.job.budget), "prompt_tokens": None,
                "output_tokens": None, "kv_bytes": None, "latency_ms": None} for r in rows]
        engine, start, kv_full = self.llm.engine, time.perf_counter(), 0
        for i, row in enumerate(rows):
            if row["error"] is None:
                try:
                    engine.add_request(to_request(row), self.sampling, request_id=i)
                except ValueError as e:
                    out[i]["error"] = f"refused by the engine: {e}"
        while engine.has_unfinished():
            for o in engine.step():
                if o.finish_reason == "error":
                    out[o.request_id]["error"] = f"refused by the engine: {o.error}"
                elif o.finished:
                    out[o.request_id].update(
                        caption=o.text, prompt_tokens=o.stats["prompt_tokens"], output_tokens=o.stats["output_tokens"],
                        kv_bytes=o.stats["kv_bytes"], latency_ms=round(1000 * (time.perf_counter() - start), 3))
                    kv_full += o.stats["kv_bytes_full"]
        done = [result for result in out if result["caption"] is not None]
        numbers = {
            "rows": len(out), "errors": len(out) - len(done), "engine_s": time.perf_counter() - start,
            "kv_bytes_full": kv_full, "prompt_tokens": sum(r["prompt_tokens"] for r in done),
            "output_tokens": sum(r["output_tokens"] for r in done), "kv_bytes": sum(r["kv_bytes"] for r in done),
        }
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA), numbers


class Captioner:
    """The actor-pool callable: `Captions` plus reporting to `ActorStats` after every batch."""

    def __init__(self, job: CaptionJob, stats):
        start = time.perf_counter()
        self.captions, self.stats = Captions(job), stats
        context = ray.get_runtime_context()
        self.key = context.get_actor_id()
        ray.get(stats.started.remote(self.key, context.get_node_id(), os.getpid(), time.perf_counter() - start,
                                     engine_slots(self.captions.llm)))

    def __call__(self, batch: pa.Table) -> pa.Table:
        table, numbers = self.captions(batch)
        ray.get(self.stats.batch.remote(self.key, numbers))
        return table
