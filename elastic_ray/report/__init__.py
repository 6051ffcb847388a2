"""Cost and throughput reports from run directories (caption job, benchmark, evaluation, Serve load
test): report.json with every figure's provenance, report.md, and a self-contained report.html.

Needs no Ray: it only reads the files runs write.
"""

from datetime import datetime, timezone
from pathlib import Path

from elastic_ray.report.figures import rows_of
from elastic_ray.report.inputs import Run, caption_run, read_runs
from elastic_ray.report.plots import draw_all
from elastic_ray.report.provenance import assumed
from elastic_ray.report.quality import latest_evaluations
from elastic_ray.report.render import write

# USD for one actor-hour (one GPU-hour on GPU runs): about an on-demand cloud GPU. An assumption.
DEFAULT_HOURLY_PRICE = 2.0

__all__ = ["DEFAULT_HOURLY_PRICE", "build", "caption_report", "read_runs", "report_dir"]


def build(runs: list[Run], out, hourly_price: float | None = None) -> Path:
    """Write the report of `runs` (plots, report.json, report.md, report.html) under `out`; returns
    report.html's path. Without `hourly_price` the default is used, and recorded as such."""
    if hourly_price is not None and not hourly_price > 0:
        raise ValueError(f"the hourly price must be positive, got {hourly_price}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    price = (assumed(DEFAULT_HOURLY_PRICE, "USD/hour", "default (elastic_ray.report.DEFAULT_HOURLY_PRICE)",
                     "hourly_price") if hourly_price is None
             else assumed(hourly_price, "USD/hour", "--hourly-price", "hourly_price"))
    evaluations = latest_evaluations(runs)
    rows = rows_of(runs, price, evaluations)
    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hourly_price": price.as_json(),
        "inputs": [{"kind": r.kind, "file": r.source, "model": r.data.get("model", "unrecorded")} for r in runs],
        "rows": [row.as_json() for row in rows],
        "evaluations": [{"model": model, "file": run.source, "cells": len(run.data["cells"])}
                        for model, run in sorted(evaluations.items())],
        "plots": draw_all(rows, evaluations, out),
    }
    return write(report, out)[2]


def report_dir(output: str) -> Path:
    """Where a caption run's report goes: `<output>.report` beside a local output; for a remote
    output (s3://...), `<last path part>.report` in the working directory."""
    if "://" in output:
        return Path(output.rstrip("/").rsplit("/", 1)[-1] + ".report")
    return Path(output.rstrip("/") + ".report")


def caption_report(metrics: dict, metrics_path: str, output: str, extra: list[Run] = ()) -> Path:
    """The report a caption run writes at its end: the run itself plus `extra` runs (evaluations for
    quality, benchmarks to compare); returns report.html's path."""
    return build([caption_run(metrics, metrics_path), *extra], report_dir(output))
