"""The run's measured numbers, and the one line the job prints at the end."""

from dataclasses import asdict, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from elastic_ray.pipeline.inputs import Input
from elastic_ray.pipeline.job import CaptionJob


def run_metrics(job: CaptionJob, found: Input, written: pa.Table, ids: pa.ChunkedArray, resumed: int, wall: float,
             actors: dict) -> dict:
    """The run's measured numbers. Row and token counts come from the files this run wrote."""
    captioned = written.filter(pc.is_null(written.column("error")))
    output_tokens = pc.sum(captioned.column("output_tokens")).as_py() or 0
    prompt_tokens = pc.sum(captioned.column("prompt_tokens")).as_py() or 0
    kv_full = sum(a["kv_bytes_full"] for a in actors.values())
    captioned_by_actors = sum(a["rows"] - a["errors"] for a in actors.values())
    latency = captioned.column("latency_ms").to_numpy()
    settings = asdict(replace(job, allow_images_from=list(job.allow_images_from)))
    return {
        "settings": settings,
        "model": job.model, "method": job.method, "budget": job.budget, "max_tokens": job.max_tokens,
        "rows": written.num_rows,
        "errors": written.num_rows - captioned.num_rows,
        "rows_in": found.rows, "rows_out": len(ids), "unique_ids": pc.count_distinct(ids).as_py(),
        "null_ids": ids.null_count, "resumed_rows": resumed,
        "wall_s": round(wall, 3),
        "rows_per_s": round(written.num_rows / wall, 3),
        "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "output_tokens_per_s": round(output_tokens / wall, 3),
        "kv_bytes_per_seq": round(pc.mean(captioned.column("kv_bytes")).as_py(), 1) if captioned.num_rows else None,
        "kv_bytes_full_per_seq": round(kv_full / captioned_by_actors, 1) if captioned_by_actors else None,
        "latency_ms_p50": round(float(np.percentile(latency, 50)), 3) if len(latency) else None,
        "latency_ms_p95": round(float(np.percentile(latency, 95)), 3) if len(latency) else None,
        "num_actors": len(actors),
        "nodes": len({a["node"] for a in actors.values()}),
        # slots per actor (one device each): the engine's, and a full cache's in the same KV budget
        "slots_per_actor": _mean([a["slots"] for a in actors.values()]),
        "full_slots_per_actor": _mean([a["full_slots"] for a in actors.values()]),
        "actors": [{"actor": key, **a, "engine_s": round(a["engine_s"], 3),
                    "captions_per_engine_s": round((a["rows"] - a["errors"]) / a["engine_s"], 3) if a["engine_s"]
                    else None}
                   for key, a in sorted(actors.items())],
    }


def _mean(values: list) -> float | None:
    return round(sum(values) / len(values), 2) if values else None


def summary(metrics: dict, job: CaptionJob) -> str:
    """The one line the job prints at the end."""
    return (f"captioned {metrics['rows']} rows ({metrics['errors']} errors) in {metrics['wall_s']:.1f} s: "
            f"{metrics['rows_per_s']:.2f} rows/s, {metrics['output_tokens_per_s']:.1f} generated tokens/s, "
            f"{metrics['num_actors']} actors; output {job.output}, metrics {job.metrics_path}")
