"""Run directories in: the caption job's metrics, a benchmark, an evaluation or a Serve load test.

    caption     <output>.metrics.json (give the output folder or the file)
    benchmark   DIR/benchmark.json    (jobs/benchmark.py)
    evaluation  DIR/results.json      (jobs/evaluate.py)
    serve       DIR/load.json and DIR/requests.jsonl (jobs/load_test.py)
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

RUN_FILES = {"benchmark.json": "benchmark", "results.json": "evaluation", "load.json": "serve"}


@dataclass(frozen=True)
class Run:
    """One input: its kind, the file it was read from, its JSON, and for a Serve load test its
    per-request rows (from requests.jsonl, `requests_source`). `modified` is the file's mtime."""

    kind: str
    source: str
    data: dict
    modified: float | None = None
    requests: list[dict] = field(default_factory=list)
    requests_source: str | None = None


def caption_run(metrics: dict, source: str, modified: float | None = None) -> Run:
    """A caption run from its metrics, already in memory (the caption job passes them; they may live on s3)."""
    return Run("caption", source, metrics, modified)


def kind_of(data: dict, path: Path) -> str:
    """A run file's kind, from its name and checked against its content."""
    kind = "caption" if path.name.endswith(".metrics.json") else RUN_FILES.get(path.name)
    expected = {"caption": "actors", "benchmark": "arms", "evaluation": "cells", "serve": "results"}
    if kind is None or expected[kind] not in data:
        raise ValueError(f"{path}: not a caption metrics file, benchmark.json, results.json or load.json")
    return kind


def read_file(path: Path) -> Run:
    data = json.loads(path.read_text())
    kind = kind_of(data, path)
    modified = path.stat().st_mtime
    if kind != "serve":
        return Run(kind, str(path), data, modified)
    requests = path.with_name("requests.jsonl")
    rows = [json.loads(line) for line in requests.read_text().splitlines() if line.strip()] if requests.exists() else []
    return Run(kind, str(path), data, modified, rows, str(requests) if requests.exists() else None)


def run_files(path: Path) -> list[Path]:
    """The run files a RUN_DIR names: itself if a file, else `<dir>.metrics.json` beside a caption
    output and any of benchmark.json, results.json and load.json inside it."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no such run directory or file: {path}")
    beside = path.with_name(path.name + ".metrics.json")
    files = ([beside] if beside.is_file() else []) + [path / name for name in RUN_FILES if (path / name).is_file()]
    if not files:
        raise FileNotFoundError(f"{path}: no {path.name}.metrics.json beside it and no "
                                f"{', '.join(RUN_FILES)} inside it")
    return files


def read_runs(paths) -> list[Run]:
    """Every run the given paths name, in order, each file once."""
    files = dict.fromkeys(f.resolve() for p in paths for f in run_files(Path(p)))
    return [read_file(f) for f in files]
