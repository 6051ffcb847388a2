"""The run's measured numbers, and the one line the job prints at the end."""

from dataclasses import asdict, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from elastic_ray.pipeline.inputs import Input
from elastic_ray.pipeline.job import CaptionJob


def run_metrics(job: CaptionJob, found: Input, output: pa.Table, this_run: pa.Table, resumed: int, wall: float,
                actors: dict) -> dict:
    """The run's measured numbers, from the output's files: row, token, KV and latency figures over
    the whole output (earlier runs' rows too, after a resume); `this_run`: this run's rows, errors
    and tokens, over which the rates (`rows_per_s`, `output_tokens_per_s`) and `wall_s` are
    counted. Per actor: its counters, `occupancy` (busy slots per decode step over slots) and
    `wait_s` (seconds its engine waited for rows)."""
    captioned = output.filter(pc.is_null(output.column("error")))
    captioned_now = this_run.filter(pc.is_null(this_run.column("error")))
    ids = output.column("id")
    kv_full = sum(a["kv_bytes_full"] for a in actors.values())
    captioned_by_actors = sum(a["rows"] - a["errors"] for a in actors.values())
    latency = captioned.column("latency_ms").to_numpy()
    settings = asdict(replace(job, allow_images_from=list(job.allow_images_from)))
    return {
        "settings": settings,
        "model": job.model, "method": job.method, "budget": job.budget, "max_tokens": job.max_tokens,
        "rows": output.num_rows,
        "errors": output.num_rows - captioned.num_rows,
        "rows_in": found.rows, "rows_out": len(ids), "unique_ids": pc.count_distinct(ids).as_py(),
        "null_ids": ids.null_count, "resumed_rows": resumed,
        "this_run": {"rows": this_run.num_rows, "errors": this_run.num_rows - captioned_now.num_rows,
                     "prompt_tokens": _sum(captioned_now, "prompt_tokens"),
                     "output_tokens": _sum(captioned_now, "output_tokens")},
        "wall_s": round(wall, 3),
        "rows_per_s": round(this_run.num_rows / wall, 3),
        "prompt_tokens": _sum(captioned, "prompt_tokens"), "output_tokens": _sum(captioned, "output_tokens"),
        "output_tokens_per_s": round(_sum(captioned_now, "output_tokens") / wall, 3),
        "kv_bytes_per_seq": round(pc.mean(captioned.column("kv_bytes")).as_py(), 1) if captioned.num_rows else None,
        "kv_bytes_full_per_seq": round(kv_full / captioned_by_actors, 1) if captioned_by_actors else None,
        "latency_ms_p50": round(float(np.percentile(latency, 50)), 3) if len(latency) else None,
        "latency_ms_p95": round(float(np.percentile(latency, 95)), 3) if len(latency) else None,
        "num_actors": len(actors),
        "nodes": len({a["node"] for a in actors.values()}),
        # slots per actor (one device each): the engine's, and a full cache's in the same KV budget
        "slots_per_actor": _mean([a["slots"] for a in actors.values()]),
        "full_slots_per_actor": _mean([a["full_slots"] for a in actors.values()]),
        "occupancy": _ratio(sum(a["busy_slots"] for a in actors.values()),
                            sum(a["slot_steps"] for a in actors.values())),
        "actors": [_actor(key, a) for key, a in sorted(actors.items())],
    }


def _actor(key: str, a: dict) -> dict:
    captions = a["rows"] - a["errors"]
    return {"actor": key, **{k: v for k, v in a.items() if k not in ("ready_at", "fed_at", "done_at")},
            "engine_s": round(a["engine_s"], 3), "intake_s": round(a["intake_s"], 3), "wait_s": round(a["wait_s"], 3),
            "cpu_s": round(a["cpu_s"], 3),
            "occupancy": _ratio(a["busy_slots"], a["slot_steps"]),
            "captions_per_engine_s": round(captions / a["engine_s"], 3) if a["engine_s"] else None}


def timings(ray_start_s: float, started_at: float, ended_at: float, actors: dict) -> dict:
    """The run's fixed cost apart from its steady rate. From the pipeline's start (`started_at`,
    wall clock): `actor_start_s` until the first caption actor was ready (process start and model
    load), `first_row_s` until the first row reached an engine; then `steady_s` from there until
    the last row was captioned, over which `steady_rows_per_s` counts the captioned rows (the
    bare engine's yardstick: its start and its drain included); `finish_s` after that until the
    pipeline ended (the last writes)."""
    fed = [a["fed_at"] for a in actors.values() if a["fed_at"] is not None]
    ready = [a["ready_at"] for a in actors.values()]
    first, last = (min(fed), max(a["done_at"] for a in actors.values() if a["done_at"] is not None)) if fed \
        else (None, None)
    captions = sum(a["rows"] - a["errors"] for a in actors.values())
    return {
        "ray_start_s": round(ray_start_s, 3),
        "actor_start_s": round(min(ready) - started_at, 3) if ready else None,
        "first_row_s": round(first - started_at, 3) if fed else None,
        "steady_s": round(last - first, 3) if fed else None,
        "steady_rows_per_s": round(captions / (last - first), 3) if fed and last > first else None,
        "finish_s": round(ended_at - last, 3) if fed else None,
    }


def _sum(table: pa.Table, column: str) -> int:
    return pc.sum(table.column(column)).as_py() or 0


def _ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole else None


def _mean(values: list) -> float | None:
    return round(sum(values) / len(values), 2) if values else None


def summary(metrics: dict, job: CaptionJob) -> str:
    """The one line the job prints at the end."""
    resumed = f", {metrics['resumed_rows']} earlier" if metrics["resumed_rows"] else ""
    run = metrics["this_run"]
    return (f"captioned {run['rows']} rows ({run['errors']} errors{resumed}) in "
            f"{metrics['wall_s']:.1f} s: {metrics['rows_per_s']:.2f} rows/s, "
            f"{metrics['output_tokens_per_s']:.1f} generated tokens/s, {metrics['num_actors']} actors, "
            f"{fidelity(metrics['quality_sample'])}; output {job.output}, metrics {job.metrics_path}")


def fidelity(quality: dict) -> str:
    """The quality sample in a few words."""
    if quality["rouge_l"] is None:
        return f"fidelity not measured ({quality['skipped']})"
    verdict = "" if quality["passed"] else f", UNDER --min-rouge {quality['min_rouge']:g}"
    return (f"fidelity ROUGE-L {quality['rouge_l']:.3f} vs full cache on {quality['rows']} rows, "
            f"{quality['degenerate']} degenerate{verdict}")


def quality_skipped(job: CaptionJob, reason: str) -> dict:
    """The metrics' `quality_sample` when none is measured, and why."""
    return {"rows": 0, "rouge_l": None, "degenerate": None, "wall_s": 0.0, "min_rouge": job.min_rouge,
            "passed": None, "skipped": reason}


def quality_judged(job: CaptionJob, measured: dict | None, in_run: bool = True) -> dict:
    """The metrics' `quality_sample` from what was measured (None: never reported); `in_run`: its
    seconds were spent inside the run's wall time, on a caption actor (else in a task after it,
    billed apart)."""
    if measured is None:
        return quality_skipped(job, "the actor measuring it stopped before it finished")
    if measured["rouge_l"] is None:
        return {**quality_skipped(job, "the engine refused every sample row"), **measured, "in_run": in_run}
    return {**measured, "min_rouge": job.min_rouge, "passed": measured["rouge_l"] >= job.min_rouge, "in_run": in_run}


def quality_warning(job: CaptionJob, quality: dict) -> str | None:
    """The loud warning for a sample under `--min-rouge`; None when it passed or was not measured."""
    if quality["passed"] is not False:
        return None
    return (f"WARNING: on {quality['rows']} sample rows, {job.method} at budget {job.budget:g} scores ROUGE-L "
            f"{quality['rouge_l']:.3f} against the full cache's captions, under --min-rouge {job.min_rouge:g}; "
            f"{quality['degenerate']} of its {quality['captioned']} sample captions are degenerate. These captions "
            "may be unusable: consider a larger --budget or other --cache-option settings.")
