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

from elastic_ray.benchmark import ARMS, run_benchmark
from elastic_ray.data.shapes import write_shards
from elastic_ray.eval.results import write_results
from elastic_ray.eval.samples import shapes_samples
from elastic_ray.eval.sweep import grid, sweep
from elastic_ray.models.loading import load
from elastic_ray.models.synthetic import random_llava
from elastic_ray.pipeline.job import CaptionJob
from elastic_ray.report import DEFAULT_PRICES, build
from elastic_ray.report.inputs import caption_run, read_runs
from elastic_ray.report.provenance import derive, measured, not_measured
from elastic_ray.report.quality import latest_evaluations, quality

JOB = CaptionJob(input="", output="")  # the caption job's defaults

REPO = Path(__file__).parents[1]
SERVE_LOAD = Path(__file__).parent / "data" / "serve_load"  # from jobs/serve.py + jobs/load_test.py, demo model
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("report")


@pytest.fixture(scope="module")
def evaluation(work) -> Path:
    """The caption job's default model at full cache and at its default method and budget, on one
    of its shapes scenes (a caption, a description and a question)."""
    model, processor = load(JOB.model)
    samples = shapes_samples(1, scenes=JOB.model)
    cells = sweep(model, processor, grid([JOB.method], [JOB.budget]), samples, max_tokens=8)
    write_results({"model": JOB.model, "data": "shapes (test split)", "samples": len(samples), "max_tokens": 8, "wall_s": 0.0,
                   "cells": cells}, work / "eval")
    return work / "eval"


@pytest.fixture(scope="module")
def benchmark(work) -> Path:
    model, processor = random_llava()
    result = run_benchmark(model, processor, num_requests=4, max_tokens=3, kv_budgets=[200_000], warmup=1, rounds=1,
                           arms=[a for a in ARMS if not a.compile])
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
         "--out", str(out), "--gpu-hourly-price", "30", "--cpu-hourly-price", "3.5"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"wrote {out / 'report.html'}"
    return out


def section(markdown: str, title: str) -> str:
    """The text under a report.md heading `## title`, up to the next `## ` heading."""
    return markdown.split(f"\n## {title}\n")[1].split("\n## ")[0]


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


@pytest.mark.slow  # a real caption job, evaluation and benchmark
def test_caption_job_writes_its_report_with_figures_from_its_metrics(caption, evaluation):
    report_path = caption["report"] / "report.html"
    assert f"report {report_path}" in caption["stdout"]
    metrics = json.loads(caption["metrics_path"].read_text())
    report = json.loads((caption["report"] / "report.json").read_text())
    (row,) = report["rows"]
    src = caption["metrics_path"]
    assert row["source"] == str(src) and (row["method"], row["budget"]) == (metrics["method"], metrics["budget"])
    for name, field in [("rows", "this_run.rows"), ("errors", "this_run.errors"),
                        ("input_tokens", "this_run.prompt_tokens"), ("generated_tokens", "this_run.output_tokens"),
                        ("wall_s", "wall_s"), ("rows_per_s", "rows_per_s"),
                        ("tokens_per_s", "output_tokens_per_s"), ("actors", "num_actors"),
                        ("kv_bytes_per_seq", "kv_bytes_per_seq"), ("kv_bytes_full_per_seq", "kv_bytes_full_per_seq")]:
        assert_measured(row, name, metrics, src, field)
    assert metrics["rows"] == 6 and metrics["output_tokens"] > 0
    actor_hours = (metrics["num_actors"] * metrics["wall_s"] + quality_sample_s(metrics)) / 3600
    assert figure(row, "actor_hours")["value"] == pytest.approx(actor_hours)
    assert figure(row, "actor_hours")["status"] == "derived"
    cpus = metrics["settings"]["cpus_per_actor"]  # a CPU run: billed per CPU-hour
    assert row["device"] == "CPU" and figure(row, "device_hours")["value"] == pytest.approx(actor_hours * cpus)
    cost = figure(row, "cost_per_million_captions")
    assert cost["value"] == pytest.approx(DEFAULT_PRICES["CPU"] * actor_hours * cpus / metrics["rows"] * 1e6)
    assert cost["assumes"] == ["cpu_hourly_price"] and report["prices"]["CPU"]["status"] == "assumed"
    assert figure(row, "rows_per_s_per_device")["value"] == pytest.approx(
        metrics["rows_per_s"] / metrics["num_actors"] / cpus)
    assert figure(row, "kv_packing_factor")["value"] == pytest.approx(
        metrics["kv_bytes_full_per_seq"] / metrics["kv_bytes_per_seq"])
    # 8 MB of KV memory: fewer full-cache slots than compressed ones
    (actor,) = metrics["actors"]
    assert metrics["slots_per_actor"] == actor["slots"] and metrics["full_slots_per_actor"] == actor["full_slots"]
    assert 0 < actor["full_slots"] < actor["slots"] and actor["slots"] * actor["slot_bytes"] <= 8_000_000
    if "quality_sample" in metrics:  # the run's own fidelity, when the job measured it
        assert_measured(row, "fidelity_rouge_l", metrics, src, "quality_sample.rouge_l")
    else:
        assert figure(row, "fidelity_rouge_l")["status"] == "not measured"
    assert_measured(row, "slots_per_device", metrics, src, "slots_per_actor")
    assert_measured(row, "slots_per_device_full", metrics, src, "full_slots_per_actor")
    assert figure(row, "slots_packing_factor")["value"] == pytest.approx(actor["slots"] / actor["full_slots"])
    for entry, actor in zip(row["actors"], metrics["actors"], strict=True):
        assert entry["captions_per_engine_s"]["value"] == actor["captions_per_engine_s"]
        assert entry["tokens_per_engine_s"]["value"] == pytest.approx(actor["output_tokens"] / actor["engine_s"])
    # quality at the run's budget, from the evaluation's cell for the job's default method and budget
    results = json.loads((evaluation / "results.json").read_text())
    (i, cell), = [(i, c) for i, c in enumerate(results["cells"]) if c["method"] == JOB.method and c["budget"] == JOB.budget]
    assert_measured(row, "rouge_l", results, evaluation / "results.json", f"cells[{i}].rouge_l")
    assert figure(row, "accuracy")["value"] == cell["accuracy"]


def made_metrics(name: str = "captions", **changes) -> dict:
    """A caption run's metrics, made by hand in the job's format with the fields the report reads:
    one CPU actor (1 CPU), elastic 0.5, 256 rows in 40 s, a quality sample of 32 rows that passed,
    start-up timings and occupancy. `changes` replace top-level fields; `settings` merges."""
    settings = {"input": "out/demo-shards", "output": f"out/{name}", "model": "demo", "method": "elastic",
                "budget": 0.5, "cache_options": [], "max_tokens": 64, "num_actors": 1, "gpus_per_actor": 0.0,
                "cpus_per_actor": 1.0, "batch_size": 64, "max_num_seqs": 16, "progress": True}
    settings |= changes.pop("settings", {})
    actor = {"actor": "a1b2c3d4e5f6a7b8", "node": "f00dfeedbeef0001", "pid": 4242, "starts": 1, "load_s": [1.9],
             "batches": 4, "rows": 256, "errors": 0, "output_tokens": 4096, "kv_bytes_full": 256 * 1_100_000,
             "slots": 16, "full_slots": 8, "slot_bytes": 1_119_744, "engine_s": 8.0, "captions_per_engine_s": 32.0,
             "occupancy": 0.81, "wait_s": 2.5}
    metrics = {"settings": settings, "model": settings["model"], "method": settings["method"],
               "budget": settings["budget"], "max_tokens": 64, "rows": 256, "errors": 0, "rows_in": 256,
               "rows_out": 256, "unique_ids": 256, "null_ids": 0, "resumed_rows": 0, "wall_s": 40.0,
               "rows_per_s": 6.4, "prompt_tokens": 256 * 210, "output_tokens": 4096, "output_tokens_per_s": 102.4,
               "kv_bytes_per_seq": 550_000.0, "kv_bytes_full_per_seq": 1_100_000.0, "latency_ms_p50": 900.0,
               "latency_ms_p95": 1500.0, "num_actors": 1, "nodes": 1, "slots_per_actor": 16.0,
               "full_slots_per_actor": 8.0, "occupancy": 0.78,
               "timings": {"ray_start_s": 6.5, "actor_start_s": 4.25, "first_row_s": 14.0, "steady_rows_per_s": 30.5},
               "quality_sample": {"rows": 32, "rouge_l": 0.93, "degenerate": 1, "wall_s": 12.0, "min_rouge": 0.5,
                                  "passed": True},
               "actors": [actor]}
    return metrics | changes


def report_of(tmp_path: Path, *metrics: dict, **prices) -> dict:
    """build() over hand-made caption runs, each saved as <settings.output>.metrics.json; report.json."""
    runs = []
    for m in metrics:
        path = tmp_path / (Path(m["settings"]["output"]).name + ".metrics.json")
        path.write_text(json.dumps(m))
        runs.append(caption_run(m, str(path)))
    build(runs, tmp_path / "report", **prices)
    return json.loads((tmp_path / "report" / "report.json").read_text())


def quality_sample_s(metrics: dict) -> float:
    """The quality sample's seconds billed beside the run's: none when it ran inside the run."""
    sample = metrics.get("quality_sample") or {}
    return 0.0 if sample.get("in_run") else sample.get("wall_s", 0.0)


def test_cpu_and_gpu_actors_are_priced_per_their_own_device_hour(tmp_path):
    cpu = made_metrics("cpu", settings={"cpus_per_actor": 2.0})
    gpu = made_metrics("gpu", num_actors=4, settings={"gpus_per_actor": 0.5, "num_actors": 4})
    report = report_of(tmp_path, cpu, gpu, gpu_hourly_price=4.0, cpu_hourly_price=0.25)
    assert {k: (p["value"], p["status"]) for k, p in report["prices"].items()} == {
        "GPU": (4.0, "assumed"), "CPU": (0.25, "assumed")}
    cpu_row, gpu_row = report["rows"]
    assert (cpu_row["device"], gpu_row["device"]) == ("CPU", "GPU")
    cpu_hours = (1 * 40.0 + 12.0) / 3600 * 2.0  # the actor's 2 CPUs for the run, plus the quality sample
    gpu_hours = (4 * 40.0 + 12.0) / 3600 * 0.5
    for row, hours, price in ((cpu_row, cpu_hours, 0.25), (gpu_row, gpu_hours, 4.0)):
        assert figure(row, "device_hours")["value"] == pytest.approx(hours)
        assert figure(row, "hourly_price")["value"] == price
        assert figure(row, "cost_per_million_captions")["value"] == pytest.approx(price * hours / 256 * 1e6)
        assert figure(row, "captions_per_device_hour")["value"] == pytest.approx(256 / hours)
    assert figure(cpu_row, "cost_per_million_captions")["assumes"] == ["cpu_hourly_price"]
    assert figure(gpu_row, "rows_per_s_per_device")["value"] == pytest.approx(6.4 / (4 * 0.5))
    assert gpu_row["actors"][0]["captions_per_engine_s_per_device"]["value"] == pytest.approx(32.0 / 0.5)
    headline = section((tmp_path / "report" / "report.md").read_text(), "Headline")
    assert "| 1 x 2 CPU |" in headline and "| 4 x 0.5 GPU |" in headline


def test_default_prices_are_recorded_as_assumed_defaults(tmp_path):
    report = report_of(tmp_path, made_metrics())
    for kind in ("GPU", "CPU"):
        price = report["prices"][kind]
        assert price["value"] == DEFAULT_PRICES[kind] and price["status"] == "assumed"
        assert price["sources"][0]["file"].startswith("default")
    assert "not measured" in (tmp_path / "report" / "report.md").read_text().split("\n")[2]  # the prices line


def test_quality_sample_and_calibration_are_each_billed_as_one_actor(tmp_path):
    auto = made_metrics(num_actors=2, budget_calibration={"method": "elastic", "budget": 0.5, "rouge_l": 0.95,
                                                          "wall_s": 36.0})
    (row,) = report_of(tmp_path, auto)["rows"]
    src = str(tmp_path / "captions.metrics.json")
    assert_measured(row, "calibration_s", auto, src, "budget_calibration.wall_s")
    assert_measured(row, "quality_sample_s", auto, src, "quality_sample.wall_s")
    actor_hours = (2 * 40.0 + 36.0 + 12.0) / 3600
    assert figure(row, "actor_hours")["value"] == pytest.approx(actor_hours)
    assert figure(row, "actor_hours")["formula"] == "(actors x wall_s + calibration_s + quality_sample_s) / 3600"
    assert figure(row, "cost_per_million_captions")["value"] == pytest.approx(
        DEFAULT_PRICES["CPU"] * actor_hours / 256 * 1e6)


def test_a_resumed_run_is_reported_and_billed_for_its_own_rows(tmp_path):
    resumed = made_metrics(resumed_rows=200, this_run={"rows": 56, "errors": 1, "prompt_tokens": 55 * 210,
                                                       "output_tokens": 880})
    (row,) = report_of(tmp_path, resumed)["rows"]
    src = str(tmp_path / "captions.metrics.json")
    for name, field in [("rows", "this_run.rows"), ("errors", "this_run.errors"),
                        ("input_tokens", "this_run.prompt_tokens"), ("generated_tokens", "this_run.output_tokens")]:
        assert_measured(row, name, resumed, src, field)
    hours = (40.0 + 12.0) / 3600  # the run's wall time and its quality sample, for its 56 captions
    assert figure(row, "cost_per_million_captions")["value"] == pytest.approx(DEFAULT_PRICES["CPU"] * hours / 56 * 1e6)


def test_a_quality_sample_measured_inside_the_run_is_not_billed_twice(tmp_path):
    inside = made_metrics()
    inside["quality_sample"]["in_run"] = True
    (row,) = report_of(tmp_path, inside)["rows"]
    assert figure(row, "quality_sample_s")["value"] == inside["quality_sample"]["wall_s"]
    assert figure(row, "actor_hours")["value"] == pytest.approx(40.0 / 3600)
    assert figure(row, "actor_hours")["formula"] == "(actors x wall_s) / 3600"


def test_the_headline_shows_rate_cost_and_the_runs_own_fidelity(tmp_path):
    report = report_of(tmp_path, made_metrics())
    (row,) = report["rows"]
    src = str(tmp_path / "captions.metrics.json")
    for name, field in [("fidelity_rouge_l", "quality_sample.rouge_l"), ("degenerate", "quality_sample.degenerate"),
                        ("quality_sample_rows", "quality_sample.rows"), ("fidelity_passed", "quality_sample.passed"),
                        ("occupancy", "occupancy"), ("ray_start_s", "timings.ray_start_s"),
                        ("first_row_s", "timings.first_row_s"), ("steady_rows_per_s", "timings.steady_rows_per_s")]:
        assert_measured(row, name, made_metrics(), src, field)
    assert figure(row, "fidelity_min_rouge")["status"] == "setting"
    assert row["actors"][0]["occupancy"]["value"] == 0.81 and row["actors"][0]["wait_s"]["value"] == 2.5
    markdown = (tmp_path / "report" / "report.md").read_text()
    table = [l for l in section(markdown, "Headline").splitlines() if l.startswith("| ")]
    header, line = table
    assert header.count(" | ") + 1 <= 8  # at most 8 columns
    hours = (40.0 + 12.0) / 3600
    cells = [c.strip() for c in line.strip("| ").split(" | ")]
    assert cells[:3] == ["caption elastic 0.5", "demo", "1 x 1 CPU"]
    assert cells[3] == f"{256 / hours:,.0f}"
    assert cells[4] == f"{DEFAULT_PRICES['CPU'] * hours / 256 * 1e6:.4g}*"
    assert cells[5] == "0.930 on 32 rows, 1 degenerate" and cells[6] == "2" and cells[7] == "0 of 256"
    assert "Warning" not in markdown


def test_a_run_below_its_fidelity_threshold_is_marked(tmp_path):
    bad = made_metrics("bad", quality_sample={"rows": 32, "rouge_l": 0.41, "degenerate": 12, "wall_s": 12.0,
                                              "min_rouge": 0.5, "passed": False})
    report_of(tmp_path, made_metrics("good"), bad)
    markdown = (tmp_path / "report" / "report.md").read_text()
    headline = section(markdown, "Headline")
    (warning,) = [l for l in headline.splitlines() if l.startswith("> **Warning:**")]
    assert warning.startswith("> **Warning:** caption elastic 0.5 (bad.metrics.json): its captions scored ROUGE-L "
                              "0.410") and "below the run's threshold of 0.5" in warning
    assert "**BELOW THRESHOLD 0.5: 0.410 on 32 rows, 12 degenerate**" in headline
    html = (tmp_path / "report" / "report.html").read_text()
    assert '<p class="warn">' in html and '<td class="alert">BELOW THRESHOLD 0.5' in html
    assert html.count('<td class="alert">') == 1  # the good run is not marked


def test_fidelity_and_timings_a_run_did_not_record_are_not_measured(tmp_path):
    old = made_metrics()
    del old["quality_sample"], old["timings"], old["occupancy"], old["actors"][0]["occupancy"]
    (row,) = report_of(tmp_path, old)["rows"]
    for name in ("fidelity_rouge_l", "degenerate", "fidelity_passed", "ray_start_s", "steady_rows_per_s", "occupancy"):
        assert figure(row, name)["status"] == "not measured" and figure(row, name)["reason"], name
    assert "quality_sample" in figure(row, "fidelity_rouge_l")["reason"]
    assert row["actors"][0]["occupancy"]["status"] == "not measured"
    assert figure(row, "actor_hours")["value"] == pytest.approx(40.0 / 3600)  # no sample to bill
    headline = section((tmp_path / "report" / "report.md").read_text(), "Headline")
    assert "| not measured |" in next(l for l in headline.splitlines() if l.startswith("| caption"))


def test_a_run_whose_metrics_lack_slots_shows_them_as_not_measured(tmp_path):
    metrics = made_metrics()
    del metrics["slots_per_actor"], metrics["full_slots_per_actor"]
    (row,) = report_of(tmp_path, metrics)["rows"]
    for name in ("slots_per_device", "slots_per_device_full", "slots_packing_factor"):
        assert figure(row, name)["value"] is None and figure(row, name)["status"] == "not measured"
        assert "slots_per_actor" in figure(row, name)["reason"]


def test_rows_are_labelled_by_the_settings_that_tell_them_apart(tmp_path):
    runs = [made_metrics("a"), made_metrics("b", settings={"cache_options": [["protect", 16]]}),
            made_metrics("c", settings={"cache_options": [["protect", 16]], "max_tokens": 32}),
            made_metrics("d", budget=0.5, settings={"budget": "auto"}), made_metrics("e"),
            made_metrics("full", method="full", budget=1.0)]
    labels = [row["label"] for row in report_of(tmp_path, *runs)["rows"]]
    assert labels == ["caption elastic 0.5 (a.metrics.json)", "caption elastic 0.5 protect=16 max_tokens=64",
                      "caption elastic 0.5 protect=16 max_tokens=32", "caption elastic auto: 0.5",
                      "caption elastic 0.5 (e.metrics.json)", "caption full 1"]


def test_a_plot_with_fewer_than_two_points_is_a_sentence(tmp_path):
    report = report_of(tmp_path, made_metrics())
    assert all(plot["file"] is None and plot["reason"] for plot in report["plots"].values())
    assert not list((tmp_path / "report").glob("*.png"))
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "Throughput against budget: not drawn, the inputs measure generated tokens/s at budget 0.5 only" in markdown
    assert "Cost per 1M captions per method: not drawn, one row has a known cost" in markdown
    two = report_of(tmp_path, made_metrics("a"), made_metrics("b", budget=0.3))
    assert len(two["plots"]["throughput_vs_budget"]["points"]) == 2 and two["plots"]["cost_per_method"]["file"]


def test_a_figure_derived_from_an_unmeasured_one_is_not_measured():
    rows = measured(10, "rows", "m.json", "rows")
    hours = not_measured("actor-hours", "no replicas recorded")
    cost = derive("USD", "price x hours / rows", lambda h, r: h / r, h=hours, r=rows)
    assert cost.value is None and cost.status == "not measured" and "no replicas recorded" in cost.reason
    zero = derive("x", "a / b", lambda a, b: a / b, a=rows, b=measured(0, "rows", "m.json", "errors"))
    assert zero.value is None and "division by zero" in zero.reason
    ratio = derive("x", "a / b", lambda a, b: a / b, a=rows, b=measured(4, "rows", "n.json", "errors"))
    assert ratio.value == 2.5 and ratio.sources == (("m.json", "rows"), ("n.json", "errors"))


@pytest.mark.slow  # a real caption job, evaluation and benchmark
def test_report_across_runs_traces_every_figure(report, benchmark, work):
    data = json.loads((report / "report.json").read_text())
    assert {k: (p["value"], p["status"]) for k, p in data["prices"].items()} == {
        "GPU": (30.0, "assumed"), "CPU": (3.5, "assumed")}
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
    threads = int(bench["device"].split("(")[1].split()[0])  # "cpu (2 threads)": billed as that many CPUs
    for row, arm in zip(arms, bench["arms"]):
        assert figure(row, "tokens_per_s")["value"] == arm["tokens_per_s"]
        assert figure(row, "slots_per_device")["value"] == arm["slots"]
        assert figure(row, "slots_packing_factor")["value"] == pytest.approx(arm["slots"] / full["slots"])
        assert figure(row, "cost_per_million_captions")["value"] == pytest.approx(
            3.5 * threads * arm["wall_s"] / 3600 / bench["workload"]["requests"] * 1e6)
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
    tables = [section(markdown, title) for title in ("Headline", "Work and throughput", "Per device and start-up",
                                                     "Time and cost", "KV memory", "Fidelity and quality")]
    for table in tables:  # one line a row, at most 8 columns
        lines = [l for l in table.splitlines() if l.startswith("| ")]
        assert len(lines) == 1 + len(data["rows"]) and all(l.count(" | ") + 1 <= 8 for l in lines), table
    assert "not measured" in tables[0]


@pytest.mark.slow  # the demo model's evaluation
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
    assert latest[JOB.model].source == str(newer / "results.json")
    expected = next(c for c in results["cells"] if c["method"] == JOB.method)["rouge_l"]
    assert quality(JOB.model, JOB.method, JOB.budget, latest)["rouge_l"].value == expected
    missing = quality(JOB.model, JOB.method, 0.3, latest)["rouge_l"]
    assert missing.value is None and f"no {JOB.method} cell at budget 0.3" in missing.reason
    assert quality("other", JOB.method, JOB.budget, latest)["rouge_l"].status == "not measured"


def test_report_needs_no_ray_and_refuses_what_is_not_a_run(tmp_path):
    code = "import sys, elastic_ray.report; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    result = subprocess.run([sys.executable, "jobs/report.py", str(tmp_path), "--out", str(tmp_path / "r")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "no benchmark.json, results.json, load.json inside it" in result.stderr


# Appended to a copy of a page: once it has loaded, the window's width, the document's, the tables and
# images that reach outside the window, and every image's natural width, as JSON in <pre id="layout">.
LAYOUT_PROBE = """<script>addEventListener('load', () => {
  const inside = e => { const r = e.getBoundingClientRect(); return r.left >= 0 && r.right <= innerWidth; };
  const layout = {innerWidth, scrollWidth: document.documentElement.scrollWidth,
    outside: [...document.querySelectorAll('table, img')].filter(e => !inside(e))
      .map(e => `${e.tagName} right ${Math.round(e.getBoundingClientRect().right)}: ${e.textContent.slice(0, 60)}`),
    images: [...document.images].map(i => i.naturalWidth)};
  const p = document.createElement('pre'); p.id = 'layout'; p.textContent = JSON.stringify(layout);
  document.body.append(p); });</script></body>"""
CHROMIUM_FLAGS = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                  "--window-size=1280,2000"]


def layout_at_1280px(page: Path, tmp_path: Path) -> dict:
    """The page opened in headless Chromium in a 1280 px window: what LAYOUT_PROBE measures."""
    probe = tmp_path / f"probe-{page.parent.name}.html"
    probe.write_text(page.read_text().replace("</body>", LAYOUT_PROBE))
    dom = subprocess.run([*CHROMIUM_FLAGS, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    return json.loads(dom.split('<pre id="layout">')[1].split("</pre>")[0])


def assert_fits_1280px(page: Path, tmp_path: Path, images: int) -> None:
    html = page.read_text()
    assert "src=\"http" not in html and "href=" not in html  # self-contained
    assert html.count("<img ") == images
    layout = layout_at_1280px(page, tmp_path)
    assert layout["innerWidth"] == 1280 and layout["scrollWidth"] <= 1280, layout
    assert layout["outside"] == [], layout["outside"]
    assert len(layout["images"]) == images and all(w > 0 for w in layout["images"]), layout["images"]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_html_report_renders_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "report.png"
    subprocess.run([*CHROMIUM_FLAGS, f"--screenshot={shot}", (report / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert Image.open(shot).size == (1280, 2000)
    assert_fits_1280px(report / "report.html", tmp_path, images=3)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_many_runs_with_long_names_stay_inside_1280px(tmp_path):
    deep = "captions_from_the_nightly_bucket_with_a_rather_long_name_" * 2  # no place to break a line
    runs = [made_metrics(f"{deep}{i}", budget=b, settings={"cache_options": [["protect", p]], "max_tokens": 32 + i})
            for i, (b, p) in enumerate([(0.2, 1), (0.3, 16), (0.5, 16), (0.7, 4), (0.9, 16)])]
    runs.append(made_metrics(f"{deep}gpu", num_actors=8, settings={"gpus_per_actor": 1.0}))
    runs.append(made_metrics(f"{deep}bad", quality_sample={"rows": 32, "rouge_l": 0.2, "degenerate": 30,
                                                           "wall_s": 9.0, "min_rouge": 0.5, "passed": False}))
    report_of(tmp_path, *runs)
    assert_fits_1280px(tmp_path / "report" / "report.html", tmp_path, images=2)  # no evaluation: no quality plot
