"""The captioning pipeline: argument checks, the prepare and caption steps on their own, then whole
runs on a real two-node Ray cluster (bad rows, a killed actor, s3:// through a local moto server)."""

import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import s3fs
import torch
from PIL import Image

from captioning import (
    LONG_INSTRUCTION, MAX_PIXELS, bad_rows, check_errors, errors_by_id, good_rows, png, prepared, ray_env,
    read_output, save_tiny_model, webdataset_shards, write_output_file, write_rows, write_tar,
)
from processes import Service
from elastic_ray import CacheConfig
from elastic_ray.data.images import decode_image
from elastic_ray.data.shapes import CAPTION_INSTRUCTION, write_shards
from elastic_ray.eval.samples import Sample
from elastic_ray.eval.spot_check import fidelity
from elastic_ray.eval.sweep import Cell, run_cell
from elastic_ray.models.loading import load
from elastic_ray.models.prompts import prepare_request
from elastic_ray.engine.engine import Engine
from elastic_ray.pipeline.captions import Captions, build_engine, engine_config, sampling
from elastic_ray.pipeline.job import CaptionJob, JobConfigError
from elastic_ray.pipeline.output import finished_ids
from elastic_ray.pipeline.prepare import PROCESSED_SCHEMA, pack, process, processor_and_limit, to_request, unpack
from elastic_ray.pipeline.reader import input_sample
from elastic_ray.pipeline.run import check

REPO = Path(__file__).parents[1]

OURS = "captions-" + "ab" * 16 + "-000000-{}.parquet"  # a name the job's CaptionFiles gives


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llava"))


def test_without_an_input_the_job_captions_its_demo_models_own_test_scenes(tmp_path, monkeypatch):
    from elastic_ray.data.shapes import make_scenes
    from elastic_ray.data.shapes_v2 import make_detailed_scenes

    spec = importlib.util.spec_from_file_location("caption_job", REPO / "jobs" / "caption.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert CaptionJob.model == "demo-v2"
    monkeypatch.setattr(job, "DEMO_ROWS", 3)
    monkeypatch.setattr(job, "DEMO_INPUTS", {"demo": str(tmp_path / "v1"), "demo-v2": str(tmp_path / "v2")})
    for model, scenes in (("demo-v2", make_detailed_scenes(3, 0, "test")), ("demo", make_scenes(3, 0, "test"))):
        path = job.write_demo_shards(model)
        assert [r["reference"] for r in pq.read_table(path).to_pylist()] == [s.caption for s in scenes]
    monkeypatch.setattr(job, "DEMO_ROWS", 5)  # a folder that exists is the input as it is, never rewritten
    assert pq.read_table(job.write_demo_shards("demo-v2")).num_rows == 3


@pytest.fixture
def shards(tmp_path):
    write_shards(tmp_path / "in", 6, rows_per_shard=3)
    return str(tmp_path / "in")


# --- Arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"input": "/does/not/exist"}, "input not found: /does/not/exist"),
    ({"id_column": "key"}, "--id-column: no column 'key'"),
    ({"image_column": "picture"}, "--image-column: no column 'picture'"),
    ({"image_path_column": "file"}, "--image-path-column: no column 'file'"),
    ({"instruction_column": "question"}, "--instruction-column: no column 'question'"),
    ({"budget": 1.5}, "budget must be in \\(0, 1\\]"),
    ({"budget": 0.5, "method": "full"}, "full"),
    ({"method": "sparse"}, "unknown cache method 'sparse'"),
    ({"model": "/no/such/model"}, "model path not found"),
    ({"max_tokens": 0}, "--max-tokens must be a positive integer"),
    ({"max_tokens": 4096}, "leaves no room for a prompt"),
    ({"num_actors": 0}, "--num-actors must be a positive integer"),
    ({"batch_size": 2.5}, "--batch-size must be a positive integer"),
    ({"gpus_per_actor": -1}, "--gpus-per-actor must be a non-negative number"),
    ({"kv_cache_memory": 0}, "--kv-cache-memory must be a positive number"),
    ({"kv_cache_memory": 1.5}, "--kv-cache-memory as a fraction must be at most 1"),
    ({"instruction": " "}, "instruction must be a non-empty string"),
    ({"budget": "auto", "method": "full"}, "--budget auto chooses a budget for a compressing method"),
    ({"budget": "auto", "target_rouge": 0}, "--target-rouge must be in \\(0, 1\\]"),
    ({"budget": "auto", "target_rouge": 1.5}, "--target-rouge must be in \\(0, 1\\]"),
    ({"budget": "auto", "calibration_rows": 0}, "--calibration-rows must be a positive integer"),
    ({"cache_options": (("protect", "16"),)}, "elastic-vl option protect must be int"),
    ({"cache_options": (("window", 4),)}, "no option\\(s\\) \\['window'\\]"),
])
def test_bad_arguments_are_refused(shards, tiny_model, tmp_path, change, message):
    job = CaptionJob(input=shards, output=str(tmp_path / "out"), model=tiny_model)
    check(job)
    with pytest.raises(JobConfigError, match=message):
        check(replace(job, **change))


def test_a_model_neither_demo_local_nor_cached_exits_2_with_one_line_before_ray(shards, tmp_path):
    result = subprocess.run(
        [sys.executable, "jobs/caption.py", "--input", shards, "--output", str(tmp_path / "out"),
         "--model", "example-org/not-in-any-cache"], capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "caption.py: error: --model, --max-tokens: model 'example-org/not-in-any-cache' is neither 'demo', a local "
        f"directory nor in the local Hugging Face cache ({tmp_path / 'hub'}); download it first "
        "(hf download example-org/not-in-any-cache)"]
    assert not (tmp_path / "out").exists()


def test_a_non_empty_output_needs_resume(shards, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part.parquet").write_bytes(b"x")
    job = CaptionJob(input=shards, output=str(tmp_path / "out"))
    with pytest.raises(JobConfigError, match="not empty; pass --resume"):
        check(job)
    check(replace(job, resume=True))


@pytest.mark.parametrize("args, message", [
    (["--budget", "2"], "bad cache settings: budget must be in (0, 1]"),
    (["--budget", "half"], "argument --budget: a number in (0, 1] or 'auto', got 'half'"),
    (["--cache-option", "protect"], "argument --cache-option: a cache option looks like KEY=VALUE"),
    (["--cache-option", "protect=high"], "option protect must be int, got 'high'"),
    (["--cache-option", "importance=max"], "option importance must be one of ('sum', 'mean', 'instruction')"),
    (["--cache-option", "offset=99999999999999999999"], "option offset must be in [1, 1048576]"),
    (["--cache-option", "layer_budgets=missing.json"], "layer_budgets: cannot read calibration file missing.json"),
    (["--budget", "0.5", "--cache-option", "layer_budgets=[0.2,0.2,0.2]"], "have mean 0.2, not the budget 0.5"),
    (["--kv-cache-memory", "lots"], "argument --kv-cache-memory: bytes (an integer) or a fraction"),
])
@pytest.mark.slow
def test_cli_refuses_bad_arguments_before_starting_ray(shards, tmp_path, args, message):
    result = subprocess.run(
        [sys.executable, "jobs/caption.py", "--input", shards, "--output", str(tmp_path / "out"), *args],
        capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Ray" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()


# --- The steps, without Ray ------------------------------------------------------------------


def test_prepare_flags_bad_images_and_instructions(tmp_path):
    expected = bad_rows()
    write_rows(tmp_path / "in.parquet", [row for row, _ in expected])
    job = CaptionJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), max_pixels=MAX_PIXELS)
    found = check(job)
    assert (found.format, found.rows, found.instruction_column) == ("parquet", len(expected), "instruction")
    table = prepared(job)
    assert table.num_rows == len(expected)
    errors = errors_by_id(table)
    for row, pattern in expected:
        if pattern is None or pattern.startswith("refused by the engine"):  # `process` judges prompt length
            assert errors[row["id"]] is None
        else:
            assert errors[row["id"]] and re.search(pattern, errors[row["id"]]), (row["id"], errors[row["id"]])
    prompts = dict(zip(table.column("id").to_pylist(), table.column("prompt").to_pylist()))
    assert prompts["good-default"] == CAPTION_INSTRUCTION
    assert prompts["good-custom"] == "what color is the shape ?"


@pytest.mark.parametrize("schema, message", [
    ([("id", pa.float64()), ("image", pa.binary())], "--id-column: column 'id' in .* is double, not string or integer"),
    ([("id", pa.string()), ("image", pa.string())],
     "--image-column: column 'image' in .* is string, not binary or struct; for image paths pass --image-path-column"),
    ([("id", pa.int64()), ("image", pa.binary()), ("instruction", pa.int64())],
     "--instruction-column: column 'instruction' in .* is int64, not string"),
])
def test_columns_of_the_wrong_type_are_refused_before_ray(tmp_path, schema, message):
    write_rows(tmp_path / "in.parquet", [], pa.schema(schema))
    with pytest.raises(JobConfigError, match=message):
        check(CaptionJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out")))


def test_prepare_reads_image_paths_only_under_the_input(tmp_path):
    (tmp_path / "in" / "images").mkdir(parents=True)
    (tmp_path / "in" / "images" / "a.png").write_bytes(png(1))
    (tmp_path / "outside.png").write_bytes(png(2))
    schema = pa.schema([("key", pa.string()), ("file", pa.string())])
    write_rows(tmp_path / "in" / "rows.parquet", [
        {"key": "relative", "file": "images/a.png"}, {"key": "absolute", "file": str(tmp_path / "in/images/a.png")},
        {"key": "escape", "file": "../outside.png"}, {"key": "missing", "file": "images/b.png"},
        {"key": "url", "file": "http://127.0.0.1:9/a.png"},
    ], schema)
    job = CaptionJob(input=str(tmp_path / "in"), output=str(tmp_path / "out"), id_column="key",
                     image_path_column="file")
    errors = errors_by_id(prepared(job))
    assert errors["relative"] is None and errors["absolute"] is None
    assert "outside the allowed locations" in errors["escape"] and "outside the allowed" in errors["url"]
    assert "missing image" in errors["missing"]
    allowed = replace(job, allow_images_from=(str(tmp_path),))
    assert errors_by_id(prepared(allowed))["escape"] is None


def test_the_reader_skips_finished_ids(shards, tmp_path):
    job = CaptionJob(input=shards, output=str(tmp_path / "out"))
    ids = [f"test-0-{i:06d}" for i in range(6)]
    assert prepared(job).column("id").to_pylist() == ids
    assert prepared(job, done=(ids[0], ids[4])).column("id").to_pylist() == ids[1:4] + ids[5:]


def test_input_sample_is_the_first_rows_prepare_passes_as_engine_requests(tmp_path):
    expected = bad_rows()
    write_rows(tmp_path / "in" / "a.parquet", [row for row, _ in expected])
    write_rows(tmp_path / "in" / "b.parquet", good_rows(5))
    job = CaptionJob(input=str(tmp_path / "in"), output=str(tmp_path / "out"), max_pixels=MAX_PIXELS)
    found = check(job)
    passed = [row for row, error in expected if error is None or error.startswith("refused by the engine")]
    sample = input_sample(job, found, len(passed) + 2)
    assert [r["id"] for r in sample] == [r["id"] for r in passed] + ["row-000", "row-001"]
    assert [r["prompt"] for r in sample] == [r["instruction"] or CAPTION_INSTRUCTION for r in passed] \
        + [CAPTION_INSTRUCTION] * 2
    assert all(r["image"].mode == "RGB" and r["image"].size == (32, 32) for r in sample)
    assert [r["id"] for r in input_sample(job, found, 1)] == ["good-default"]


def test_input_sample_of_an_image_folder(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "0-broken.png").write_bytes(b"\x89PNG broken")
    for i in range(1, 4):
        (tmp_path / "in" / f"{i}.png").write_bytes(png(i))
    job = CaptionJob(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    assert [r["id"] for r in input_sample(job, check(job), 2)] == ["1.png", "2.png"]


def test_finished_ids_drops_the_jobs_files_cut_short(tmp_path):
    write_output_file(tmp_path / OURS.format(0), ["row-000", "row-001", "row-002"])
    data = (tmp_path / OURS.format(0)).read_bytes()
    (tmp_path / OURS.format(1)).write_bytes(data[: len(data) // 2])
    ids = finished_ids(fsspec.filesystem("file"), str(tmp_path))
    assert sorted(ids.to_pylist()) == ["row-000", "row-001", "row-002"]
    assert sorted(os.listdir(tmp_path)) == [OURS.format(0)]


def test_process_gives_the_engine_its_inputs_and_flags_prompts_over_its_limit(tiny_model, tmp_path):
    expected = bad_rows()
    write_rows(tmp_path / "in.parquet", [row for row, _ in expected])
    job = CaptionJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), model=tiny_model,
                     max_tokens=4, max_pixels=MAX_PIXELS)
    table = prepared(job)
    processed = process(table, job=job)
    assert processed.column("id").to_pylist() == table.column("id").to_pylist()
    errors = errors_by_id(processed)
    for row, pattern in expected:
        if pattern is None:
            assert errors[row["id"]] is None
        else:
            assert errors[row["id"]] and re.search(pattern, errors[row["id"]]), (row["id"], errors[row["id"]])
    # the CPU stage's limit is the engine's, and its tensors are the processor's own
    engine = build_engine(job)
    assert processor_and_limit(tiny_model, 4)[1] == engine.max_prompt_tokens
    row = processed.filter(pc.equal(processed.column("id"), "good-custom")).to_pylist()[0]
    source = table.filter(pc.equal(table.column("id"), "good-custom")).to_pylist()[0]
    direct = engine.prepare(to_request(source))
    unpacked = unpack(row)
    assert unpacked.prompt_tokens == direct.prompt_tokens == row["prompt_tokens"]
    assert unpacked.inputs.keys() == direct.inputs.keys()
    for name, tensor in direct.inputs.items():
        assert unpacked.inputs[name].dtype == tensor.dtype and torch.equal(unpacked.inputs[name], tensor)


@pytest.mark.parametrize("options", [
    (("protect", 16), ("merge", False)),
    (("importance", "instruction"), ("protect_text", True), ("assign", "key")),  # as --cache-option KEY=VALUE reads them
])
def test_the_engine_runs_the_method_with_its_options(shards, tiny_model, tmp_path, options):
    job = CaptionJob(input=shards, output=str(tmp_path / "out"), model=tiny_model, method="elastic", budget=0.5,
                     max_tokens=4, cache_options=options)
    check(job)
    captions = Captions(job)
    try:
        assert captions.engine.policy == CacheConfig("elastic", 0.5, **dict(options)).policy
    finally:
        captions.close()


def test_captions_flag_what_the_engine_refuses_and_keep_rows_flagged_before(tiny_model, tmp_path):
    write_rows(tmp_path / "in.parquet", good_rows(5))
    job = CaptionJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), model=tiny_model,
                     max_tokens=4, batch_size=4)
    processed = process(prepared(job), job=job).to_pylist()
    # a row the CPU stage let through that the engine refuses: a prompt over its limit
    long = {"image": Image.new("RGB", (32, 32)), "prompt": LONG_INSTRUCTION}
    over = prepare_request(processor_and_limit(tiny_model, 4)[0], long)
    processed[2].update(inputs=pack(over), prompt_tokens=over.prompt_tokens)
    processed[3].update(inputs=None, prompt_tokens=None, error="flagged before")
    captions = Captions(job)
    try:
        table, numbers = captions(pa.Table.from_pylist(processed, schema=PROCESSED_SCHEMA))
    finally:
        captions.close()
    assert table.schema.names == ["id", "caption", "error", "model", "method", "budget", "prompt_tokens",
                                  "output_tokens", "kv_bytes", "latency_ms"]
    check_errors(table, [(r, None) for r in good_rows(5)[:2] + good_rows(5)[4:]]
                 + [(good_rows(5)[2], "refused by the engine: .*over the engine's limit"),
                    (good_rows(5)[3], "flagged before")])
    assert numbers["rows"] == 5 and numbers["errors"] == 2
    assert numbers["output_tokens"] == sum(v for v in table.column("output_tokens").to_pylist() if v)
    assert numbers["fed_at"] <= numbers["done_at"]


def test_batches_in_flight_share_one_engine_and_each_returns_with_its_own_rows(tiny_model, tmp_path):
    write_rows(tmp_path / "in.parquet", good_rows(12))
    job = CaptionJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), model=tiny_model,
                     max_tokens=24, max_num_seqs=4)
    processed = process(prepared(job), job=job)
    captions = Captions(job)
    try:
        alone = captions(processed)[0].sort_by("id")
        before = captions.loop.stats()
        steps = before.decode_steps
        with ThreadPoolExecutor(4) as pool:  # four batches of three rows at once, as Ray Data calls an actor
            tables = list(pool.map(lambda start: captions(processed.slice(start, 3))[0], (0, 3, 6, 9)))
        shared = captions.loop.stats()
    finally:
        captions.close()
    assert [t.column("id").to_pylist() for t in tables] == [[f"row-{i:03d}" for i in range(s, s + 3)]
                                                            for s in (0, 3, 6, 9)]
    together = pa.concat_tables(tables).sort_by("id")
    assert together.column("caption").to_pylist() == alone.column("caption").to_pylist()
    # the batches filled each other's free slots: about the decode steps of one batch of twelve rows
    # on four slots, where one batch of three after another would leave a slot idle throughout
    assert shared.decode_steps - steps <= steps + 3
    assert (shared.busy_slots - before.busy_slots) / (shared.slots - before.slots) > 0.95


def test_a_row_that_fails_to_start_is_its_own_error_and_its_batch_goes_on(tiny_model, tmp_path, monkeypatch):
    write_rows(tmp_path / "in.parquet", good_rows(3))
    job = CaptionJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), model=tiny_model, max_tokens=4)
    processed = process(prepared(job), job=job)
    captions = Captions(job)
    add_request, calls = captions.engine.add_request, []

    def second_fails(request, sampling):  # a fault the engine did not foresee, on the batch's second row
        calls.append(request)
        if len(calls) == 2:
            raise OSError("device lost")
        return add_request(request, sampling)

    monkeypatch.setattr(captions.engine, "add_request", second_fails)
    try:
        table, numbers = captions(processed)
    finally:
        captions.close()
    errors = dict(zip(table.column("id").to_pylist(), table.column("error").to_pylist()))
    assert errors == {"row-000": None, "row-001": "the request could not start: OSError: device lost", "row-002": None}
    assert numbers["errors"] == 1 and all(table.column("caption").to_pylist()[i] for i in (0, 2))


# --- Whole runs on a two-node Ray cluster ----------------------------------------------------


@contextlib.contextmanager
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

# Credentials for the moto server; the cluster's workers inherit them.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def cluster_service(tmp_path_factory):
    """tests/two_node_cluster.py in its own process; yields it with its address, raylet pids and client env."""
    env = {**os.environ, **ray_env(), **S3_ENV}
    log = tmp_path_factory.mktemp("cluster") / "cluster.log"
    service = Service("the two-node Ray cluster",
                      [sys.executable, str(Path(__file__).with_name("two_node_cluster.py"))], log, env=env,
                      stdin=subprocess.PIPE, text=True)
    try:
        line = service.wait_for(lambda: next((l for l in log.read_text().splitlines() if l.startswith('{"address"')),
                                             None), 180, "its address")
        info = json.loads(line)
        service.pids = info["raylets"]
        yield {**info, "env": env, "service": service}
    finally:
        service.proc.stdin.close()  # its signal to shut the cluster down
        service.stop(sig=None, grace=60)


@pytest.fixture
def cluster(cluster_service):
    """The module's cluster, checked before each test: a test after it died fails at once, with its log."""
    cluster_service["service"].check()
    return cluster_service


def caption_command(cluster, *args) -> list[str]:
    """jobs/caption.py on the cluster; without a quality sample unless `args` ask for one."""
    sample = [] if "--quality-sample" in args else ["--quality-sample", "0"]
    return [sys.executable, "jobs/caption.py", "--address", cluster["address"], "--no-progress", "--no-report",
            *sample, *map(str, args)]


def caption(cluster, *args) -> subprocess.CompletedProcess:
    result = cluster["service"].run(caption_command(cluster, *args), timeout=300, cwd=REPO, env=cluster["env"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_run_on_two_nodes_flags_bad_rows_and_writes_each_id_once(cluster, tiny_model, tmp_path):
    expected = bad_rows()
    no_id = {"id": None, "image": png(7), "instruction": None}
    write_rows(tmp_path / "in" / "bad.parquet", [row for row, _ in expected] + [no_id])
    expected.append(({**no_id, "id": f"bad.parquet#{len(expected)}"}, None))
    write_rows(tmp_path / "in" / "good.parquet", good_rows(13))
    out = tmp_path / "out"
    result = caption(cluster, "--input", tmp_path / "in", "--output", out, "--model", tiny_model, "--max-tokens", 4,
                     "--num-actors", 2, "--batch-size", 3, "--max-pixels", MAX_PIXELS, "--rows-per-file", 5,
                     "--quality-sample", 3, "--min-rouge", 1.0)
    assert "captioned 25 rows (9 errors)" in result.stdout
    table = read_output(str(out))
    assert table.num_rows == 25
    assert sorted(table.column("id").to_pylist()) == sorted(
        [r["id"] for r, _ in expected] + [f"row-{i:03d}" for i in range(13)])
    check_errors(table, expected)
    assert set(table.column("method").to_pylist()) == {"elastic-vl"} and set(table.column("budget").to_pylist()) == {0.9}
    metrics = json.loads((tmp_path / "out.metrics.json").read_text())
    assert (metrics["rows"], metrics["errors"], metrics["rows_in"], metrics["rows_out"]) == (25, 9, 25, 25)
    assert metrics["output_tokens"] == sum(v for v in table.column("output_tokens").to_pylist() if v)
    assert metrics["rows_per_s"] > 0 and 0 < metrics["kv_bytes_per_seq"] < metrics["kv_bytes_full_per_seq"]
    assert metrics["num_actors"] == 2 and metrics["nodes"] == 2  # an actor on each node
    assert all(a["starts"] == 1 for a in metrics["actors"])
    assert sum(a["rows"] for a in metrics["actors"]) == 25
    # occupancy and waiting per actor, the fixed cost apart from the steady rate
    assert all(a["occupancy"] is None or 0 < a["occupancy"] <= 1 for a in metrics["actors"])
    assert all(a["wait_s"] >= 0 for a in metrics["actors"])
    busy, slot_steps = (sum(a[k] for a in metrics["actors"]) for k in ("busy_slots", "slot_steps"))
    assert metrics["occupancy"] == round(busy / slot_steps, 4)
    t = metrics["timings"]
    assert 0 < t["actor_start_s"] <= t["first_row_s"] < metrics["wall_s"] and t["ray_start_s"] > 0
    assert t["steady_s"] > 0 and t["steady_rows_per_s"] == pytest.approx(16 / t["steady_s"], rel=0.01)
    assert t["finish_s"] >= 0
    # the run's own fidelity on its first 3 good rows, and a loud warning when under --min-rouge
    quality = metrics["quality_sample"]
    assert (quality["rows"], quality["min_rouge"]) == (3, 1.0) and 0 <= quality["degenerate"] <= 3
    assert quality["passed"] == (quality["rouge_l"] >= 1.0) and quality["wall_s"] > 0
    assert ("WARNING: on 3 sample rows" in result.stderr) == (not quality["passed"])
    assert f"fidelity ROUGE-L {quality['rouge_l']:.3f} vs full cache on 3 rows" in result.stdout
    job = CaptionJob(input=str(tmp_path / "in"), output=str(out), model=tiny_model, max_tokens=4,
                     max_pixels=MAX_PIXELS)
    requests = input_sample(job, check(replace(job, output=str(tmp_path / "elsewhere"))), 3)
    model = load(tiny_model)
    with one_torch_thread():  # as in the actor, which has one CPU
        texts, full = ([o.text for o in Engine(*model, cache.policy, engine_config(job)).generate(
            requests, sampling(job)) if o.error is None]
            for cache in (CacheConfig(job.method, job.budget, **dict(job.cache_options)), CacheConfig("full", 1.0)))
    assert fidelity(texts, full) == {k: quality[k] for k in ("rouge_l", "degenerate", "degenerate_full")}
    assert quality["captioned"] == len(texts) == 2  # the long instruction is refused by both
    # quiet: the summary, and no lines of Ray's own that do not concern the user
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) <= 4, lines
    assert not any("core_worker.cc" in line or "Progress bars" in line for line in lines), lines


def _captioners(raylets: list[int]) -> dict[int, bool]:
    """Caption actor processes under these raylets (Ray titles them after the UDF), and whether each
    has been constructed (while its constructor runs, Ray titles it `...Captioner)).__init__`)."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0]
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError):  # the process has just exited
            continue
        if b"Captioner" in title and parent in raylets:
            found[int(entry)] = not title.endswith(b".__init__")
    return found


ROWS_OUTLASTING_A_RESTART = 160


@pytest.mark.slow
def test_a_killed_actor_is_replaced_and_every_row_still_arrives(cluster, tiny_model, tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(ROWS_OUTLASTING_A_RESTART):
        (tmp_path / "in" / f"{i:03d}.png").write_bytes(png(i))
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    # two slots an actor: the rows left after the kill outlast the replacement's start (a loaded
    # machine takes tens of seconds), so the replacement is seen to take work
    job = subprocess.Popen(
        caption_command(cluster, "--input", tmp_path / "in", "--output", out, "--model", tiny_model,
                        "--max-tokens", 64, "--num-actors", 2, "--batch-size", 2, "--max-num-seqs", 2,
                        "--batches-in-flight", 1, "--rows-per-file", 2),
        cwd=REPO, env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    # rows are written and both actors are constructed (the first rows go to the first actor up)
    while (not list(out.glob("*.parquet")) or sorted(_captioners(cluster["raylets"]).values()) != [True, True]) \
            and job.poll() is None and time.time() < deadline:
        cluster["service"].check()
        time.sleep(0.05)
    victims = list(_captioners(cluster["raylets"]))
    assert len(victims) == 2 and job.poll() is None, "the run ended before an actor could be killed"
    os.kill(victims[0], signal.SIGKILL)
    finished = cluster["service"].communicate(job, timeout=300)
    assert finished.returncode == 0, finished.stderr[-4000:]
    table = read_output(str(out))
    assert sorted(table.column("id").to_pylist()) == sorted(
        [f"{i:03d}.png" for i in range(ROWS_OUTLASTING_A_RESTART)] + ["broken.png"])
    assert errors_by_id(table)["broken.png"].startswith("undecodable")
    metrics = json.loads((tmp_path / "out.metrics.json").read_text())
    assert metrics["rows_out"] == metrics["unique_ids"] == ROWS_OUTLASTING_A_RESTART + 1
    assert victims[0] not in [a["pid"] for a in metrics["actors"]]
    assert sorted(a["starts"] for a in metrics["actors"]) == [1, 2]


@pytest.mark.slow
def test_a_resume_after_the_input_grew_records_the_whole_output_and_every_run(cluster, tiny_model, tmp_path):
    write_rows(tmp_path / "in" / "a.parquet", good_rows(6, "a"))
    out, metrics_file = tmp_path / "out", tmp_path / "out.metrics.json"
    args = ["--input", tmp_path / "in", "--output", out, "--model", tiny_model, "--max-tokens", 4, "--batch-size", 2]
    caption(cluster, *args)
    first = json.loads(metrics_file.read_text())
    write_rows(tmp_path / "in" / "b.parquet", good_rows(3, "b"))
    result = caption(cluster, *args, "--resume")
    assert "captioned 3 rows (0 errors, 6 earlier)" in result.stdout
    metrics = json.loads(metrics_file.read_text())
    table = read_output(str(out))
    assert (metrics["rows"], metrics["resumed_rows"], metrics["this_run"]["rows"]) == (9, 6, 3)
    assert metrics["this_run"]["output_tokens"] == sum(
        t for i, t in zip(table.column("id").to_pylist(), table.column("output_tokens").to_pylist()) if i[0] == "b")
    assert metrics["output_tokens"] == sum(table.column("output_tokens").to_pylist())
    assert metrics["rows_per_s"] == round(3 / metrics["wall_s"], 3)
    assert [r["rows"] for r in metrics["runs"]] == [6, 3]
    assert metrics["runs"][0] == first["runs"][0] and metrics["runs"][1]["wall_s"] == metrics["wall_s"]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 in its own process; yields the endpoint URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Service("the moto S3 server", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                     tmp_path_factory.mktemp("s3") / "moto.log", env={**os.environ, **S3_ENV})

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        server.wait_for(listening, 60, "a listening port")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop(grace=10)


@pytest.mark.slow
def test_s3_input_image_paths_and_output_through_a_local_server(cluster, tiny_model, s3_server, monkeypatch):
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    s3 = s3fs.S3FileSystem(endpoint_url=s3_server)
    s3.mkdir("captions")
    for i in range(5):
        s3.pipe(f"captions/in/images/{i}.png", png(i))
    s3.pipe("captions/elsewhere/x.png", png(9))
    schema = pa.schema([("key", pa.int64()), ("path", pa.string()), ("prompt", pa.string())])
    rows = [{"key": i, "path": f"images/{i}.png", "prompt": None} for i in range(5)]
    rows += [{"key": 5, "path": "s3://captions/elsewhere/x.png", "prompt": "what ?"},
             {"key": 6, "path": "images/missing.png", "prompt": None}]
    s3.pipe("captions/in/rows.parquet", _parquet_bytes(rows, schema))
    args = ["--input", "s3://captions/in", "--output", "s3://captions/out", "--model", tiny_model, "--max-tokens", 4,
            "--id-column", "key", "--image-path-column", "path", "--instruction-column", "prompt",
            "--endpoint-url", s3_server, "--batch-size", 4]
    caption(cluster, *args)
    errors = errors_by_id(read_output("s3://captions/out", endpoint_url=s3_server))
    assert sorted(errors) == [str(i) for i in range(7)]
    assert [errors[str(i)] for i in range(5)] == [None] * 5
    assert "outside the allowed locations" in errors["5"] and "missing image" in errors["6"]
    assert json.loads(s3.cat("captions/out.metrics.json"))["rows"] == 7
    s3.rm("captions/out", recursive=True)
    caption(cluster, *args, "--allow-images-from", "s3://captions/elsewhere")
    assert errors_by_id(read_output("s3://captions/out", endpoint_url=s3_server))["5"] is None


@pytest.mark.slow
def test_webdataset_shards_on_s3_with_duplicate_keys_kept_apart(cluster, tiny_model, s3_server, monkeypatch, tmp_path):
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    expected = webdataset_shards(tmp_path / "shards")
    write_tar(tmp_path / "shards" / "00004.tar", [("000000001.png", png(20)), ("000000001.json", b"{}")])
    expected["000000001#00004.tar#0"] = None  # a key already in 00000.tar
    s3 = s3fs.S3FileSystem(endpoint_url=s3_server)
    s3.mkdir("tars")
    for shard in (tmp_path / "shards").iterdir():
        s3.pipe(f"tars/in/{shard.name}", shard.read_bytes())
    args = ["--input", "s3://tars/in", "--output", "s3://tars/out", "--model", tiny_model, "--max-tokens", 4,
            "--endpoint-url", s3_server, "--batch-size", 4, "--allow-duplicate-ids"]
    result = caption(cluster, *args)
    errors = errors_by_id(read_output("s3://tars/out", endpoint_url=s3_server))
    assert sorted(errors) == sorted(expected)
    for key, pattern in expected.items():
        assert (errors[key] is None) if pattern is None else re.search(pattern, errors[key] or ""), (key, errors[key])
    bad = sum(p is not None for p in expected.values())
    assert f"captioned {len(expected)} rows ({bad} errors)" in result.stdout


def _parquet_bytes(rows: list[dict], schema: pa.Schema) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    return sink.getvalue().to_pybytes()


@pytest.mark.slow
def test_budget_auto_calibrates_on_the_input_and_captions_at_its_choice(cluster, tmp_path):
    write_shards(tmp_path / "in", 12, rows_per_shard=6)
    out, target, rows, max_tokens = tmp_path / "out", 0.8, 8, 24
    result = caption(cluster, "--input", tmp_path / "in", "--output", out, "--method", "h2o", "--budget", "auto",
                     "--target-rouge", target, "--calibration-rows", rows, "--max-tokens", max_tokens)
    metrics = json.loads((tmp_path / "out.metrics.json").read_text())
    choice = metrics["budget_calibration"]
    assert (choice["method"], choice["target_rouge"], choice["rows"]) == ("h2o", target, rows)
    tried = choice["tried"]
    assert [t["budget"] for t in tried] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9][:len(tried)]
    assert all(t["rouge_l"] < target for t in tried[:-1])
    if choice["rouge_l"] is None:  # nothing below 1.0 met the target: the full cache's budget
        assert choice["budget"] == 1.0 and len(tried) == 9 and tried[-1]["rouge_l"] < target
    else:
        assert choice["budget"] == tried[-1]["budget"] and choice["rouge_l"] == tried[-1]["rouge_l"] >= target
    assert metrics["budget"] == choice["budget"]
    assert set(read_output(str(out)).column("budget").to_pylist()) == {choice["budget"]}
    assert f"budget auto: h2o at {choice['budget']}" in result.stdout

    # The recorded figures are measurements: the first tried budget, re-run here on the same rows
    # (one thread, as in the Ray task), scores the same ROUGE-L.
    table = pq.read_table(tmp_path / "in").slice(0, rows).to_pylist()
    samples = [Sample(r["id"], decode_image(r["image"]), r["instruction"], "", "reference") for r in table]
    model, processor = load(CaptionJob.model)  # the job ran its default model
    with one_torch_thread():
        _, full = run_cell(model, processor, Cell("full", 1.0), samples, max_tokens, score_ppl=False)
        first, _ = run_cell(model, processor, Cell("h2o", tried[0]["budget"]), samples, max_tokens, full,
                            score_ppl=False)
    assert first["rouge_l"] == pytest.approx(tried[0]["rouge_l"])


SAMPLE_APART = """
import json, sys, threading, time
from elastic_ray.eval.spot_check import fidelity
from elastic_ray.pipeline.job import CaptionJob
from elastic_ray.pipeline.run import run


def score(captions, references):
    if threading.current_thread().name == "quality-sample":  # the actor's own measurement never ends
        time.sleep(3600)
    return fidelity(captions, references)


job = CaptionJob(input=sys.argv[1], output=sys.argv[2], model=sys.argv[3], max_tokens=4, quality_sample=3,
                 progress=False)
print(json.dumps(run(job, score=score)["quality_sample"]))
"""


@pytest.mark.slow
def test_a_quality_sample_the_pipeline_outran_is_measured_after_it(shards, tiny_model, tmp_path):
    """A small input can be captioned before the actor measuring the sample has finished; the
    sample is then measured in a task of its own after the pipeline, not left unmeasured."""
    script = tmp_path / "sample_apart.py"
    script.write_text(SAMPLE_APART)
    result = subprocess.run([sys.executable, str(script), shards, str(tmp_path / "out"), tiny_model], cwd=REPO,
                            env={**os.environ, **ray_env()}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    quality = json.loads(result.stdout.strip().splitlines()[-1])
    assert quality["in_run"] is False and quality["rows"] == quality["captioned"] == 3
    assert quality["rouge_l"] is not None and quality["passed"] == (quality["rouge_l"] >= 0.5)
