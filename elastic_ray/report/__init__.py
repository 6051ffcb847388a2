"""Cost and throughput reports from run directories (caption job, benchmark, evaluation, Serve load
test): report.json with every figure's provenance, report.md, and a self-contained report.html.

Needs no Ray and no torch: it only reads the files runs write. Importing it is quick (matplotlib
loads when a report is built), so the jobs can parse their arguments first.
"""

from datetime import datetime, timezone
from pathlib import Path

from elastic_ray.report.figures import rows_of
from elastic_ray.report.inputs import Run, caption_run, read_runs
from elastic_ray.report.prices import DEFAULT_PRICES, prices
from elastic_ray.report.quality import latest_evaluations
from elastic_ray.report.render import write

__all__ = ["DEFAULT_PRICES", "build", "caption_report", "read_runs", "report_dir"]


def build(runs: list[Run], out, gpu_hourly_price: float | None = None, cpu_hourly_price: float | None = None) -> Path:
    """Write the report of `runs` (plots, report.json, report.md, report.html) under `out`; returns
    report.html's path. A price not given is the default, and recorded as such."""
    from elastic_ray.report.plots import draw_all  # matplotlib: only when drawing

    price = prices(gpu=gpu_hourly_price, cpu=cpu_hourly_price)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    evaluations = latest_evaluations(runs)
    rows = rows_of(runs, price, evaluations)
    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "prices": {kind: figure.as_json() for kind, figure in price.items()},
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
    quality, benchmarks to compare), at the default prices; returns report.html's path."""
    return build([caption_run(metrics, metrics_path), *extra], report_dir(output))
