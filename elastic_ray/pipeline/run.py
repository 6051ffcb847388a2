"""The run: check, connect to Ray, optionally calibrate the budget, caption a sample with the full
cache too (the run's own fidelity), then read -> prepare -> process -> caption -> write_parquet,
and verify that every input id is in the output once."""

import json
import logging
import os
import time
from dataclasses import replace

import pyarrow as pa
import pyarrow.compute as pc
import ray
from pyarrow.fs import FSSpecHandler, PyFileSystem
from ray.data import ActorPoolStrategy, DataContext

from elastic_ray.pipeline.actor import ActorStats, Captioner, measure_sample_apart
from elastic_ray.pipeline.console import quiet_ray
from elastic_ray.pipeline.inputs import Input, inspect_input
from elastic_ray.pipeline.job import CaptionJob, JobConfigError, check_settings
from elastic_ray.pipeline.metrics import quality_judged, quality_skipped, quality_warning, run_metrics, timings
from elastic_ray.pipeline.output import CaptionFiles, check_output, finished_ids, our_files, read_files
from elastic_ray.pipeline.prepare import prepare, process
from elastic_ray.pipeline.progress import Progress
from elastic_ray.pipeline.reader import SAMPLE_SCAN_FACTOR, input_sample, read_input

logger = logging.getLogger(__name__)


def check(job: CaptionJob) -> Input:
    """Validate every argument and inspect the input (schema, row count) and output; no Ray."""
    check_settings(job)
    found = inspect_input(job)
    check_output(job)
    return found


def output_complete(job: CaptionJob, found: Input) -> bool:
    """Whether the output's files are whole and hold one row per input row with distinct ids, as a
    finished run leaves them. Reads only; no file is changed."""
    fs, root = job.filesystem(job.output)
    ids = read_files(fs, our_files(fs, root), ["id"]).column("id")  # a file cut short is not ours
    return len(ids) == found.rows and pc.count_distinct(ids).as_py() == len(ids) - ids.null_count


def run(job: CaptionJob, calibrate=None, score=None) -> dict | None:
    """Check, caption, write, verify every input id is in the output once; return the metrics, or
    None when `job.resume` finds the output already complete (then nothing is started or written).

    Connects to `job.address` (or `RAY_ADDRESS`), joins a Ray already initialised in this
    process, or starts a local one on 127.0.0.1. With `budget="auto"`, `calibrate(job, requests)`
    first runs as a Ray task with one caption actor's resources on `input_sample`'s requests and
    returns a dict whose "budget" the run uses. Unless the method is full or `job.quality_sample`
    is 0, a caption actor also captions the input's first good rows with the full cache, and
    `score(captions, references)` scores its captions against those ("rouge_l", "degenerate");
    a score under `job.min_rouge` is warned about as soon as it is known. Both go into the metrics.
    """
    found = check(job)
    if job.resume and output_complete(job, found):
        return None
    if job.budget == "auto" and calibrate is None:
        raise ValueError("budget 'auto' needs a calibrate function")
    quiet_ray()
    owned = not ray.is_initialized()
    start = time.perf_counter()
    if owned:
        address = job.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                     logging_level=logging.WARNING)
    ray_start_s = time.perf_counter() - start
    try:
        _check_resources(job)
        calibration = None
        if job.budget == "auto":
            calibration = _calibrate(job, found, calibrate)
            job = replace(job, budget=calibration["budget"])
        quality = _quality_sample(job, found)
        if isinstance(quality, list) and score is None:
            raise ValueError("a quality sample needs a score function (or quality_sample=0)")
        return _execute(job, found, ray_start_s, calibration, quality, score)
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


def _quality_sample(job: CaptionJob, found: Input) -> list[dict] | dict:
    """The quality sample's requests (the input's first good rows), or its metrics entry when none is
    measured: with --method full (the reference itself) or --quality-sample 0."""
    if job.quality_sample == 0:
        return quality_skipped(job, "--quality-sample 0")
    if job.method == "full":
        return quality_skipped(job, "--method full is the reference: ROUGE-L 1.0 by definition")
    requests = input_sample(job, found, job.quality_sample)
    return requests or quality_skipped(job, f"no good row among the input's first "
                                           f"{SAMPLE_SCAN_FACTOR * job.quality_sample}")


def _execute(job: CaptionJob, found: Input, ray_start_s: float, calibration: dict | None, quality: list | dict,
             score) -> dict:
    out_fs, out_root = job.filesystem(job.output)
    done = finished_ids(out_fs, out_root) if job.resume else pa.array([], pa.string())
    earlier = _earlier_runs(job) if job.resume else []
    before = set(our_files(out_fs, out_root))
    stats = ActorStats.remote()
    measured = isinstance(quality, list)  # else the entry saying why there is no sample
    # the requests nested in a list: only the actor that measures them fetches them
    to_measure = {"sample": [ray.put(quality)], "score": score} if measured else {}

    def warn(result: dict) -> None:
        if (text := quality_warning(job, quality_judged(job, result))) is not None:
            logger.warning(text)

    try:
        started_at, start = time.time(), time.perf_counter()
        with Progress(stats, found.rows - len(done), job.progress, warn if measured else None):
            _write_captions(job, found, done, stats, to_measure)
        wall = time.perf_counter() - start
        actors = ray.get(stats.snapshot.remote())
        if measured:
            result, in_run = ray.get(stats.sample.remote()), True
            if result is None:  # the pipeline ended before its actor finished the sample: measure it apart
                task = ray.remote(measure_sample_apart).options(num_cpus=job.cpus_per_actor,
                                                                num_gpus=job.gpus_per_actor or None)
                result, in_run = ray.get(task.remote(job, quality, score)), False
                warn(result)
            quality = quality_judged(job, result, in_run)
    finally:
        ray.kill(stats)
    files = our_files(out_fs, out_root)
    columns = ["id", "error", "prompt_tokens", "output_tokens", "kv_bytes", "latency_ms"]
    output = read_files(out_fs, files, columns)
    this_run = read_files(out_fs, [f for f in files if f not in before], columns)
    metrics = run_metrics(job, found, output, this_run, len(done), wall, actors)
    metrics["timings"] = timings(ray_start_s, started_at, started_at + wall, actors)
    metrics["quality_sample"] = quality
    if calibration is not None:
        metrics["budget_calibration"] = calibration
    metrics["runs"] = earlier + [{
        "rows": metrics["this_run"]["rows"], "wall_s": metrics["wall_s"], "num_actors": metrics["num_actors"],
        "gpus_per_actor": job.gpus_per_actor, "cpus_per_actor": job.cpus_per_actor,
        "calibration_s": calibration["wall_s"] if calibration else 0.0, "quality_sample_s": quality["wall_s"]}]
    with out_fs.open(out_root.rstrip("/") + ".metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    if metrics["rows_out"] != found.rows or metrics["unique_ids"] != metrics["rows_out"] - metrics["null_ids"]:
        raise RuntimeError(f"output {job.output} has {metrics['rows_out']} rows ({metrics['unique_ids']} distinct "
                           f"ids) for {found.rows} input rows; see {job.metrics_path}")
    return metrics


def _earlier_runs(job: CaptionJob) -> list[dict]:
    """The runs an earlier metrics file of this output records (a killed run leaves none)."""
    fs, root = job.filesystem(job.output)
    path = root.rstrip("/") + ".metrics.json"
    if not fs.exists(path):
        return []
    with fs.open(path) as f:
        earlier = json.load(f)
    return earlier.get("runs") or [{"rows": earlier["rows"], "wall_s": earlier["wall_s"],
                                    "num_actors": earlier["num_actors"]}]


def _write_captions(job: CaptionJob, found: Input, done: pa.Array, stats, to_measure: dict) -> None:
    """The Ray Data pipeline: read -> prepare -> process -> caption -> write_parquet."""
    out_fs, out_root = job.filesystem(job.output)
    context = DataContext.get_current()
    context.enable_progress_bars = False  # `Progress` prints one line instead
    # Not `wait_for_min_actors_s`: Ray Data's start would block on the actors' model loading before
    # any read task ran, so the CPU stages (and their processor's load) would follow it instead of
    # overlapping it. A pool the cluster cannot place still fails, by Ray Data's no-progress guard
    # (`execution_no_progress_timeout_s`, 30 minutes by default).
    ds = read_input(job, found, done)
    ds = ds.map_batches(prepare, batch_size=None, batch_format="pyarrow", fn_kwargs={"job": job, "found": found})
    ds = ds.map_batches(process, batch_size=job.batch_size, batch_format="pyarrow", fn_kwargs={"job": job})
    # Blocks of one batch each, so every actor gets work however few and large the input files are.
    ds = ds.repartition(target_num_rows_per_block=job.batch_size)
    # Each actor runs `batches_in_flight` calls at once, on threads that share its engine loop: their
    # rows queue in the loop, so a returning batch never leaves a slot idle, and no more are sent,
    # so the first actor up takes no more than that before the others are.
    pool = ActorPoolStrategy(size=job.num_actors, max_concurrent_calls_per_actor=job.batches_in_flight,
                             max_tasks_in_flight_per_actor=job.batches_in_flight, enable_true_multi_threading=True)
    ds = ds.map_batches(Captioner, compute=pool, batch_size=job.batch_size, batch_format="pyarrow",
                        num_cpus=job.cpus_per_actor, num_gpus=job.gpus_per_actor or None,
                        fn_constructor_kwargs={"job": job, "stats": stats, **to_measure},
                        udf_modifying_row_count=False)
    ds.write_parquet(out_root, filesystem=PyFileSystem(FSSpecHandler(out_fs)), min_rows_per_file=job.rows_per_file,
                     filename_provider=CaptionFiles())

