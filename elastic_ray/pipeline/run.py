"""The run: check, connect to Ray, optionally calibrate the budget, then read -> prepare ->
caption -> write_parquet, and verify that every input id is in the output once."""

import json
import os
import time
from dataclasses import replace

import pyarrow as pa
import ray
from pyarrow.fs import FSSpecHandler, PyFileSystem
from ray.data import ActorPoolStrategy, DataContext

from elastic_ray.pipeline.actor import ActorStats, Captioner
from elastic_ray.pipeline.inputs import Input, inspect_input
from elastic_ray.pipeline.job import CaptionJob, JobConfigError, check_settings
from elastic_ray.pipeline.metrics import run_metrics
from elastic_ray.pipeline.output import CaptionFiles, check_output, finished_ids, our_files, read_files
from elastic_ray.pipeline.prepare import prepare
from elastic_ray.pipeline.reader import SAMPLE_SCAN_FACTOR, input_sample, read_input

ACTOR_START_TIMEOUT_S = 600


def check(job: CaptionJob) -> Input:
    """Validate every argument and inspect the input (schema, row count) and output; no Ray."""
    check_settings(job)
    found = inspect_input(job)
    check_output(job)
    return found


def run(job: CaptionJob, calibrate=None) -> dict:
    """Check, caption, write, verify every input id is in the output once; return the metrics.

    Connects to `job.address` (or `RAY_ADDRESS`), joins a Ray already initialised in this
    process, or starts a local one on 127.0.0.1. With `budget="auto"`, `calibrate(job, requests)`
    first runs as a Ray task with one caption actor's resources, on `input_sample`'s requests, and
    returns a dict whose "budget" the run then uses; the dict goes into the metrics.
    """
    found = check(job)
    if job.budget == "auto" and calibrate is None:
        raise ValueError("budget 'auto' needs a calibrate function")
    owned = not ray.is_initialized()
    if owned:
        address = job.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False)
    try:
        _check_resources(job)
        calibration = None
        if job.budget == "auto":
            calibration = _calibrate(job, found, calibrate)
            job = replace(job, budget=calibration["budget"])
        return _execute(job, found, calibration)
    finally:
        if owned:
            ray.shutdown()


def _check_resources(job: CaptionJob) -> None:
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if job.num_actors * job.gpus_per_actor > gpus:
        raise JobConfigError(f"{job.num_actors} actors x {job.gpus_per_actor} GPUs need "
                             f"{job.num_actors * job.gpus_per_actor} GPUs; the cluster has {gpus:g}")
    # Actors holding every CPU leave none for the read, prepare and write tasks: Ray waits forever.
    if job.num_actors * job.cpus_per_actor > cpus - 1:
        raise JobConfigError(f"{job.num_actors} actors x {job.cpus_per_actor} CPUs leave less than one of the "
                             f"cluster's {cpus:g} CPUs for reading and writing; lower --num-actors or "
                             "--cpus-per-actor")


def _calibrate(job: CaptionJob, found: Input, calibrate) -> dict:
    requests = input_sample(job, found, job.calibration_rows)
    if not requests:
        raise JobConfigError(f"--budget auto: no good row to calibrate on among the input's first "
                             f"{SAMPLE_SCAN_FACTOR * job.calibration_rows} rows")
    start = time.perf_counter()
    task = ray.remote(calibrate).options(num_cpus=job.cpus_per_actor, num_gpus=job.gpus_per_actor)
    calibration = ray.get(task.remote(job, requests))
    return {**calibration, "rows": len(requests), "wall_s": round(time.perf_counter() - start, 3)}


def _execute(job: CaptionJob, found: Input, calibration: dict | None = None) -> dict:
    out_fs, out_root = job.filesystem(job.output)
    done = finished_ids(out_fs, out_root) if job.resume else pa.array([], pa.string())
    before = set(our_files(out_fs, out_root))
    stats = ActorStats.remote()
    try:
        start = time.perf_counter()
        _write_captions(job, found, done, stats)
        wall = time.perf_counter() - start
        actors = ray.get(stats.snapshot.remote())
    finally:
        ray.kill(stats)
    ours = our_files(out_fs, out_root)
    written = read_files(out_fs, [f for f in ours if f not in before],
                         ["error", "prompt_tokens", "output_tokens", "kv_bytes", "latency_ms"])
    ids = read_files(out_fs, ours, ["id"]).column("id")
    metrics = run_metrics(job, found, written, ids, len(done), wall, actors)
    if calibration is not None:
        metrics["budget_calibration"] = calibration
    with out_fs.open(out_root.rstrip("/") + ".metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    if metrics["rows_out"] != found.rows or metrics["unique_ids"] != metrics["rows_out"] - metrics["null_ids"]:
        raise RuntimeError(f"output {job.output} has {metrics['rows_out']} rows ({metrics['unique_ids']} distinct "
                           f"ids) for {found.rows} input rows; see {job.metrics_path}")
    return metrics


def _write_captions(job: CaptionJob, found: Input, done: pa.Array, stats) -> None:
    """The Ray Data pipeline: read -> prepare -> caption -> write_parquet."""
    out_fs, out_root = job.filesystem(job.output)
    context = DataContext.get_current()
    context.enable_progress_bars = job.progress
    # Start only once the whole pool is up: work spreads over every actor, and a pool the cluster
    # cannot place fails with a timeout instead of waiting silently.
    context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    ds = read_input(job, found, done)
    ds = ds.map_batches(prepare, batch_size=None, batch_format="pyarrow", fn_kwargs={"job": job, "found": found})
    # Blocks of one batch each, so every actor gets work however few and large the input files are.
    ds = ds.repartition(target_num_rows_per_block=job.batch_size)
    ds = ds.map_batches(Captioner, compute=ActorPoolStrategy(size=job.num_actors), batch_size=job.batch_size,
                        batch_format="pyarrow", num_cpus=job.cpus_per_actor, num_gpus=job.gpus_per_actor or None,
                        fn_constructor_kwargs={"job": job, "stats": stats}, udf_modifying_row_count=False)
    ds.write_parquet(out_root, filesystem=PyFileSystem(FSSpecHandler(out_fs)), min_rows_per_file=job.rows_per_file,
                     filename_provider=CaptionFiles())
