"""Reports (jobs/report.py, elastic_ray.report) from small real runs: every figure checked against the
input field it names, the caption job's automatic report, and the HTML in headless Chromium."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from elastic_ray.benchmark import run_benchmark
from elastic_ray.data.shapes import write_shards
from elastic_ray.eval.results import write_results
from elastic_ray.eval.samples import shapes_samples
from elastic_ray.eval.sweep import grid, sweep
from elastic_ray.models.loading import load
from elastic_ray.models.synthetic import random_llava
from elastic_ray.report import DEFAULT_HOURLY_PRICE, build
from elastic_ray.report.inputs import caption_run, read_runs
from elastic_ray.report.provenance import derive, measured, not_measured
from elastic_ray.report.quality import latest_evaluations, quality

REPO = Path(__file__).parents[1]
SERVE_LOAD = Path(__file__).parent / "data" / "serve_load"  # from jobs/serve.py + jobs/load_test.py, demo model
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("report")


@pytest.fixture(scope="module")
def evaluation(work) -> Path:
    """The demo model at full cache and the caption job's default (elastic-vl 0.6) on one shapes scene
    (a caption and a question)."""
    model, processor = load("demo")
    cells = sweep(model, processor, grid(["elastic-vl"], [0.6]), shapes_samples(1), max_tokens=8)
    write_results({"model": "demo", "data": "shapes (test split)", "samples": 2, "max_tokens": 8, "wall_s": 0.0,
                   "cells": cells}, work / "eval")
    return work / "eval"


@pytest.fixture(scope="module")
def benchmark(work) -> Path:
    model, processor = random_llava()
    result = run_benchmark(model, processor, num_requests=4, max_tokens=3, kv_budget_bytes=200_000, warmup=1)
    result["model"] = "tiny random LLaVA"
    (work / "bench").mkdir()
    (work / "bench" / "benchmark.json").write_text(json.dumps(result))
    return work / "bench"


@pytest.fixture(scope="module")
def caption(work, evaluation) -> dict:
    """jobs/caption.py on 6 shapes rows with the demo model, its report including the evaluation."""
    write_shards(work / "in", 6, rows_per_shard=3)
    out = work / "captions"
    result = subprocess.run(
        [sys.executable, "jobs/caption.py", "--input", str(work / "in"), "--output", str(out), "--max-tokens", "8",
         "--batch-size", "3", "--kv-cache-memory", "8000000", "--no-progress", "--report-with", str(evaluation)],
        cwd=REPO, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"out": out, "stdout": result.stdout, "report": work / "captions.report",
            "metrics_path": work / "captions.metrics.json"}


@pytest.fixture(scope="module")
def report(work, caption, evaluation, benchmark) -> Path:
    """jobs/report.py over a caption run, an evaluation, a benchmark and a Serve load test."""
    shutil.copytree(SERVE_LOAD, work / "load")
    out = work / "report"
    result = subprocess.run(
        [sys.executable, "jobs/report.py", str(caption["out"]), str(evaluation), str(benchmark), str(work / "load"),
         "--out", str(out), "--hourly-price", "3.5"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"wrote {out / 'report.html'}"
    return out


def figure(row: dict, name: str) -> dict:
    return row["figures"][name]


def value_at(data: dict, field: str):
    """A JSON value by the path report.json records: `a.b`, `arms[2].slots`."""
    for part in field.replace("[", ".[").split("."):
        data = data[int(part[1:-1])] if part.startswith("[") else data[part]
    return data


def assert_measured(row: dict, name: str, data: dict, source: Path, field: str) -> None:
    f = figure(row, name)
    assert f["status"] == "measured" and f["sources"] == [{"file": str(source), "field": field}]
    assert f["value"] == value_at(data, field)


def test_caption_job_writes_its_report_with_figures_from_its_metrics(caption, evaluation):
    report_path = caption["report"] / "report.html"
    assert f"report {report_path}" in caption["stdout"]
    metrics = json.loads(caption["metrics_path"].read_text())
    report = json.loads((caption["report"] / "report.json").read_text())
    (row,) = report["rows"]
    src = caption["metrics_path"]
    assert row["source"] == str(src) and (row["method"], row["budget"]) == (metrics["method"], metrics["budget"])
    for name, field in [("rows", "rows"), ("errors", "errors"), ("input_tokens", "prompt_tokens"),
                        ("generated_tokens", "output_tokens"), ("wall_s", "wall_s"), ("rows_per_s", "rows_per_s"),
                        ("tokens_per_s", "output_tokens_per_s"), ("actors", "num_actors"),
                        ("kv_bytes_per_seq", "kv_bytes_per_seq"), ("kv_bytes_full_per_seq", "kv_bytes_full_per_seq")]:
        assert_measured(row, name, metrics, src, field)
    assert metrics["rows"] == 6 and metrics["output_tokens"] > 0
    actor_hours = metrics["num_actors"] * metrics["wall_s"] / 3600
    assert figure(row, "actor_hours")["value"] == pytest.approx(actor_hours)
    assert figure(row, "actor_hours")["status"] == "derived"
    cost = figure(row, "cost_per_million_captions")
    assert cost["value"] == pytest.approx(DEFAULT_HOURLY_PRICE * actor_hours / metrics["rows"] * 1e6)
    assert cost["assumes"] == ["hourly_price"] and report["hourly_price"]["status"] == "assumed"
    assert figure(row, "rows_per_s_per_actor")["value"] == pytest.approx(metrics["rows_per_s"] / metrics["num_actors"])
    assert figure(row, "kv_packing_factor")["value"] == pytest.approx(
        metrics["kv_bytes_full_per_seq"] / metrics["kv_bytes_per_seq"])
    # 8 MB of KV memory: fewer full-cache slots than elastic-vl 0.6 ones
    (actor,) = metrics["actors"]
    assert metrics["slots_per_actor"] == actor["slots"] and metrics["full_slots_per_actor"] == actor["full_slots"]
    assert 0 < actor["full_slots"] < actor["slots"] and actor["slots"] * actor["slot_bytes"] <= 8_000_000
    assert_measured(row, "slots_per_device", metrics, src, "slots_per_actor")
    assert_measured(row, "slots_per_device_full", metrics, src, "full_slots_per_actor")
    assert figure(row, "slots_packing_factor")["value"] == pytest.approx(actor["slots"] / actor["full_slots"])
    assert "rows_per_s_per_gpu" not in row["figures"]  # a CPU run
    for entry, actor in zip(row["actors"], metrics["actors"], strict=True):
        assert entry["captions_per_engine_s"]["value"] == actor["captions_per_engine_s"]
        assert entry["tokens_per_engine_s"]["value"] == pytest.approx(actor["output_tokens"] / actor["engine_s"])
    # quality at the run's budget, from the evaluation's elastic-vl 0.6 cell
    results = json.loads((evaluation / "results.json").read_text())
    (i, cell), = [(i, c) for i, c in enumerate(results["cells"]) if c["method"] == "elastic-vl" and c["budget"] == 0.6]
    assert_measured(row, "rouge_l", results, evaluation / "results.json", f"cells[{i}].rouge_l")
    assert figure(row, "accuracy")["value"] == cell["accuracy"]


def test_gpu_runs_are_priced_per_gpu_hour(caption, tmp_path):
    metrics = json.loads(caption["metrics_path"].read_text())
    metrics["settings"]["gpus_per_actor"] = 0.5  # the same run, as if each actor held half a GPU
    build([caption_run(metrics, "gpu.metrics.json")], tmp_path, hourly_price=4.0)
    (row,) = json.loads((tmp_path / "report.json").read_text())["rows"]
    gpus = metrics["num_actors"] * 0.5
    assert figure(row, "rows_per_s_per_gpu")["value"] == pytest.approx(metrics["rows_per_s"] / gpus)
    gpu_hours = gpus * metrics["wall_s"] / 3600
    assert figure(row, "gpu_hours")["value"] == pytest.approx(gpu_hours)
    assert figure(row, "cost_per_million_captions")["value"] == pytest.approx(4.0 * gpu_hours / metrics["rows"] * 1e6)
    for entry, actor in zip(row["actors"], metrics["actors"]):
        assert entry["captions_per_engine_s_per_gpu"]["value"] == pytest.approx(actor["captions_per_engine_s"] / 0.5)


def test_an_auto_budget_calibration_is_billed_as_one_actor(caption, tmp_path):
    metrics = json.loads(caption["metrics_path"].read_text())
    metrics["budget_calibration"] = {"method": "elastic", "budget": 0.5, "rouge_l": 0.95, "wall_s": 36.0}
    build([caption_run(metrics, "auto.metrics.json")], tmp_path, hourly_price=2.0)
    (row,) = json.loads((tmp_path / "report.json").read_text())["rows"]
    assert_measured(row, "calibration_s", metrics, "auto.metrics.json", "budget_calibration.wall_s")
    actor_hours = (metrics["num_actors"] * metrics["wall_s"] + 36.0) / 3600
    assert figure(row, "actor_hours")["value"] == pytest.approx(actor_hours)
    assert figure(row, "cost_per_million_captions")["value"] == pytest.approx(2.0 * actor_hours / metrics["rows"] * 1e6)


def test_a_run_whose_metrics_lack_slots_shows_them_as_not_measured(caption, tmp_path):
    metrics = json.loads(caption["metrics_path"].read_text())
    del metrics["slots_per_actor"], metrics["full_slots_per_actor"]
    build([caption_run(metrics, "old.metrics.json")], tmp_path)
    (row,) = json.loads((tmp_path / "report.json").read_text())["rows"]
    for name in ("slots_per_device", "slots_per_device_full", "slots_packing_factor"):
        assert figure(row, name)["value"] is None and figure(row, name)["status"] == "not measured"
        assert "slots_per_actor" in figure(row, name)["reason"]


def test_a_figure_derived_from_an_unmeasured_one_is_not_measured():
    rows = measured(10, "rows", "m.json", "rows")
    hours = not_measured("actor-hours", "no replicas recorded")
    cost = derive("USD", "price x hours / rows", lambda h, r: h / r, h=hours, r=rows)
    assert cost.value is None and cost.status == "not measured" and "no replicas recorded" in cost.reason
    zero = derive("x", "a / b", lambda a, b: a / b, a=rows, b=measured(0, "rows", "m.json", "errors"))
    assert zero.value is None and "division by zero" in zero.reason
    ratio = derive("x", "a / b", lambda a, b: a / b, a=rows, b=measured(4, "rows", "n.json", "errors"))
    assert ratio.value == 2.5 and ratio.sources == (("m.json", "rows"), ("n.json", "errors"))


def test_report_across_runs_traces_every_figure(report, benchmark, work):
    data = json.loads((report / "report.json").read_text())
    assert data["hourly_price"]["value"] == 3.5 and data["hourly_price"]["status"] == "assumed"
    for row in data["rows"]:
        for name, f in row["figures"].items():
            if f["status"] == "measured":  # every measured figure is the field it names
                (source,) = f["sources"]
                assert f["value"] == value_at(json.loads(Path(source["file"]).read_text()), source["field"]), name
            elif f["status"] == "not measured":
                assert f["value"] is None and f["reason"], name
            else:
                assert f["sources"], name

    bench = json.loads((benchmark / "benchmark.json").read_text())
    arms = [r for r in data["rows"] if r["kind"] == "benchmark"]
    assert len(arms) == len(bench["arms"])
    full = next(a for a in bench["arms"] if a["method"] == "full")
    for row, arm in zip(arms, bench["arms"]):
        assert figure(row, "tokens_per_s")["value"] == arm["tokens_per_s"]
        assert figure(row, "slots_per_device")["value"] == arm["slots"]
        assert figure(row, "slots_packing_factor")["value"] == pytest.approx(arm["slots"] / full["slots"])
        assert figure(row, "cost_per_million_captions")["value"] == pytest.approx(
            3.5 * arm["wall_s"] / 3600 / bench["workload"]["requests"] * 1e6)
        assert figure(row, "errors")["status"] == "not measured"
        assert figure(row, "rouge_l")["status"] == "not measured"  # no evaluation of this model

    load = json.loads((work / "load" / "load.json").read_text())
    requests = [json.loads(line) for line in (work / "load" / "requests.jsonl").read_text().splitlines()]
    served = [r for r in data["rows"] if r["kind"] == "serve"]
    assert len(served) == len(load["results"])
    for row, result in zip(served, load["results"]):
        mine = [r for r in requests if (r["method"], r["budget"]) == (result["method"], result["budget"])
                and r["status"] == 200]
        assert figure(row, "input_tokens")["value"] == sum(r["prompt_tokens"] for r in mine)
        assert figure(row, "generated_tokens")["value"] == sum(r["completion_tokens"] for r in mine)
        assert figure(row, "errors")["value"] == result["requests"] - result["ok"]
        assert figure(row, "actor_hours")["value"] is None  # replicas are not recorded
        assert figure(row, "cost_per_million_captions")["status"] == "not measured"
        engine = next(e for e in load["server"]["engines"]
                      if (e["method"], e["budget"]) == (row["method"], row["budget"]))
        assert figure(row, "slots_per_device")["value"] == engine["slots"]

    assert {p: data["plots"][p]["file"] for p in data["plots"]} == {p: f"{p}.png" for p in data["plots"]}
    for plot in data["plots"].values():
        assert Image.open(report / plot["file"]).format == "PNG"
    markdown = (report / "report.md").read_text()
    comparison = markdown.split("## Comparison across runs")[1].split("## Plots")[0]
    assert len([l for l in comparison.splitlines() if l.startswith("| ")]) == 1 + len(data["rows"])
    assert "not measured" in comparison


def test_latest_evaluation_of_the_model_gives_the_quality(evaluation, work):
    newer = work / "eval-newer"
    newer.mkdir()
    results = json.loads((evaluation / "results.json").read_text())
    for cell in results["cells"]:
        cell["rouge_l"] = cell["rouge_l"] / 2
    (newer / "results.json").write_text(json.dumps(results))
    stamp = (evaluation / "results.json").stat().st_mtime
    os.utime(newer / "results.json", (stamp + 10, stamp + 10))
    runs = read_runs([newer, evaluation])
    latest = latest_evaluations(runs)
    assert latest["demo"].source == str(newer / "results.json")
    expected = next(c for c in results["cells"] if c["method"] == "elastic-vl")["rouge_l"]
    assert quality("demo", "elastic-vl", 0.6, latest)["rouge_l"].value == expected
    missing = quality("demo", "elastic-vl", 0.3, latest)["rouge_l"]
    assert missing.value is None and "no elastic-vl cell at budget 0.3" in missing.reason
    assert quality("other", "elastic-vl", 0.6, latest)["rouge_l"].status == "not measured"


def test_report_needs_no_ray_and_refuses_what_is_not_a_run(tmp_path):
    code = "import sys, elastic_ray.report; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    result = subprocess.run([sys.executable, "jobs/report.py", str(tmp_path), "--out", str(tmp_path / "r")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "no benchmark.json, results.json, load.json inside it" in result.stderr


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_html_report_renders_in_headless_chromium(report, tmp_path):
    html = (report / "report.html").read_text()
    assert "src=\"http" not in html and "href=" not in html  # self-contained
    images = html.count("<img ")
    assert images == len(json.loads((report / "report.json").read_text())["plots"]) == 3
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    shot = tmp_path / "report.png"
    subprocess.run([*flags, "--window-size=1400,2000", f"--screenshot={shot}", (report / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert Image.open(shot).size == (1400, 2000)
    # a copy of the page that lists every image's natural width once the page has loaded
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", "<script>addEventListener('load', () => { const p = "
                                  "document.createElement('pre'); p.id = 'widths'; p.textContent = JSON.stringify("
                                  "[...document.images].map(i => i.naturalWidth)); document.body.append(p); });"
                                  "</script></body>"))
    dom = subprocess.run([*flags, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    widths = json.loads(dom.split('<pre id="widths">')[1].split("</pre>")[0])
    assert len(widths) == images and all(w > 0 for w in widths), widths
