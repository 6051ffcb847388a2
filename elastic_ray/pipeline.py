"""The Ray Data captioning job: shards in, exactly one caption row per input row out, resumable.

    read (Parquet shards or a folder of images, local or s3://)
      -> prepare on CPU tasks (decode and validate the image, resolve the instruction)
      -> caption on an actor pool, one `LLM` per actor
      -> write_parquet

A bad row never fails the job: it is written with `error` set and a null caption. Resume reads
the ids already in the output's complete files and skips them; a file cut short by a kill has
no Parquet footer and is deleted first. `run` writes `<output>.metrics.json` (measured values).
"""

import json
import os
import posixpath
import time
from dataclasses import asdict, dataclass, field, replace

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
from PIL import Image
from pyarrow.fs import FSSpecHandler, PyFileSystem
from ray.data import ActorPoolStrategy, DataContext

from elastic_ray import LLM, CacheConfig, EngineConfig, SamplingParams
from elastic_ray.data.images import IMAGE_EXTENSIONS, MAX_PIXELS, ImageError, ImageSource, decode_image
from elastic_ray.data.shapes import CAPTION_INSTRUCTION
from elastic_ray.models.loading import check_local_model, load
from elastic_ray.models.prompts import default_prompt_tokens

OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()), ("caption", pa.string()), ("error", pa.string()),
    ("model", pa.string()), ("method", pa.string()), ("budget", pa.float64()),
    ("prompt_tokens", pa.int64()), ("output_tokens", pa.int64()), ("kv_bytes", pa.int64()),
    ("latency_ms", pa.float64()),
])
PREPARED_SCHEMA = pa.schema([
    ("id", pa.string()), ("pixels", pa.large_binary()), ("width", pa.int32()), ("height", pa.int32()),
    ("prompt", pa.string()), ("error", pa.string()),
])


ACTOR_START_TIMEOUT_S = 600


class JobConfigError(ValueError):
    """A bad argument, found before any cluster work starts."""


@dataclass(frozen=True)
class CaptionJob:
    """Everything one captioning run needs. `check()` validates it without touching Ray."""

    input: str
    output: str
    model: str = "demo"
    method: str = "elastic"
    budget: float | str = 0.5  # or "auto": calibrated on the input, see `run`
    cache_options: tuple[tuple[str, object], ...] = ()  # the method's options, e.g. (("protect", 16),)
    target_rouge: float = 0.9
    calibration_rows: int = 32
    max_tokens: int = 64
    instruction: str = CAPTION_INSTRUCTION
    num_actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    batch_size: int = 64
    max_num_seqs: int = 16
    kv_cache_memory: int | float = 0.25  # per actor: bytes, or a fraction of the device's free memory
    resume: bool = False
    id_column: str = "id"
    image_column: str = "image"
    image_path_column: str | None = None
    instruction_column: str | None = None
    endpoint_url: str | None = None
    allow_images_from: tuple[str, ...] = ()
    max_pixels: int = MAX_PIXELS
    rows_per_file: int = 1000
    address: str | None = None
    progress: bool = True

    @property
    def storage_options(self) -> dict:
        return {"s3": {"endpoint_url": self.endpoint_url}} if self.endpoint_url else {}

    @property
    def metrics_path(self) -> str:
        return self.output.rstrip("/") + ".metrics.json"

    def filesystem(self, path: str):
        """The fsspec filesystem for a path and the path without its protocol."""
        protocol = path.split("://", 1)[0] if "://" in path else "file"
        return fsspec.core.url_to_fs(path, **self.storage_options.get(protocol, {}))


@dataclass
class Input:
    """A checked input: its format ("parquet" or "images"), files, row count and columns to read.

    `root` and `files` are paths on the input's filesystem (no protocol); `location` is `root`
    as a URL (or a local path), under which relative image paths resolve.
    """

    format: str
    root: str
    location: str
    files: list[str]
    rows: int
    columns: list[str] = field(default_factory=list)
    instruction_column: str | None = None


def _positive(flag: str, value, *, integer: bool = True, zero: bool = False) -> None:
    number = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not number or value < 0 or (value == 0 and not zero):
        kind = "integer" if integer else "number"
        raise JobConfigError(f"{flag} must be a {'non-negative' if zero else 'positive'} {kind}, got {value!r}")


def check(job: CaptionJob) -> Input:
    """Validate every argument and inspect the input (schema, row count) and output; no Ray."""
    for name in ("max_tokens", "num_actors", "batch_size", "max_num_seqs", "max_pixels", "rows_per_file",
                 "calibration_rows"):
        _positive("--" + name.replace("_", "-"), getattr(job, name))
    _positive("--gpus-per-actor", job.gpus_per_actor, integer=False, zero=True)
    _positive("--cpus-per-actor", job.cpus_per_actor, integer=False)
    _positive("--kv-cache-memory", job.kv_cache_memory, integer=False)
    if isinstance(job.kv_cache_memory, float) and job.kv_cache_memory > 1:
        raise JobConfigError(f"--kv-cache-memory as a fraction must be at most 1, got {job.kv_cache_memory!r}")
    auto = job.budget == "auto"
    if auto and job.method == "full":
        raise JobConfigError("--budget auto chooses a budget for a compressing method; --method full keeps "
                             "every entry")
    try:
        CacheConfig(job.method, 0.5 if auto else job.budget, **dict(job.cache_options))
    except (ValueError, TypeError) as e:
        raise JobConfigError(f"bad cache settings: {e}") from e
    if auto and (isinstance(job.target_rouge, bool) or not isinstance(job.target_rouge, (int, float))
                 or not 0 < job.target_rouge <= 1):
        raise JobConfigError(f"--target-rouge must be in (0, 1], got {job.target_rouge!r}")
    if not isinstance(job.instruction, str) or not job.instruction.strip():
        raise JobConfigError("instruction must be a non-empty string")
    _check_model(job)
    found = inspect_input(job)
    _check_output(job)
    return found


def _check_model(job: CaptionJob) -> None:
    try:
        check_local_model(job.model, job.max_tokens)
    except ValueError as e:
        raise JobConfigError(f"--model, --max-tokens: {e}") from e


def inspect_input(job: CaptionJob) -> Input:
    """The input's format, files, row count and the columns to read; a bad input raises JobConfigError."""
    fs, root = job.filesystem(job.input)
    fs.invalidate_cache(root)
    if not fs.exists(root):
        raise JobConfigError(f"input not found: {job.input}")
    files = sorted(fs.find(root)) if fs.isdir(root) else [root]
    parquet = [f for f in files if f.endswith(".parquet")]
    images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    base = root if fs.isdir(root) else posixpath.dirname(root)
    location = f"{job.input.split('://', 1)[0]}://{base}" if "://" in job.input else base
    if parquet:
        return _inspect_parquet(job, fs, base, location, parquet)
    if images:
        if job.image_path_column or job.instruction_column:
            raise JobConfigError("--image-path-column and --instruction-column apply to Parquet input, "
                                 f"but {job.input} holds image files")
        return Input("images", base, location, images, len(images))
    raise JobConfigError(f"no .parquet or image files ({', '.join(IMAGE_EXTENSIONS)}) under {job.input}")


def _inspect_parquet(job: CaptionJob, fs, root: str, location: str, files: list[str]) -> Input:
    try:
        dataset = pads.dataset(files, format="parquet", filesystem=PyFileSystem(FSSpecHandler(fs)))
        rows = dataset.count_rows()
    except (OSError, pa.ArrowInvalid) as e:
        raise JobConfigError(f"cannot read the Parquet input {job.input}: {e}") from e
    names = dataset.schema.names
    image_column = job.image_path_column or job.image_column
    for flag, column in (("--id-column", job.id_column), ("--image-path-column" if job.image_path_column
                                                         else "--image-column", image_column)):
        if column not in names:
            raise JobConfigError(f"{flag}: no column {column!r} in {job.input}; columns: {names}")
    if job.instruction_column is not None and job.instruction_column not in names:
        raise JobConfigError(f"--instruction-column: no column {job.instruction_column!r} in {job.input}; "
                             f"columns: {names}")
    instruction = job.instruction_column or ("instruction" if "instruction" in names else None)
    columns = [job.id_column, image_column] + ([instruction] if instruction else [])
    return Input("parquet", root, location, files, rows, columns, instruction)


def _check_output(job: CaptionJob) -> None:
    fs, out = job.filesystem(job.output)
    fs.invalidate_cache(out)
    if fs.exists(out) and not fs.isdir(out):
        raise JobConfigError(f"output {job.output} is a file; it must be a directory")
    if fs.exists(out) and fs.find(out) and not job.resume:
        raise JobConfigError(f"output {job.output} is not empty; pass --resume to finish it, "
                             "or choose a new output")


# --- The two map stages ---------------------------------------------------------------------


def prepare(batch: pa.Table, *, job: CaptionJob, found: Input, done: pa.Array) -> pa.Table:
    """CPU stage: one prepared row (RGB pixels and prompt, or an error) per input row whose id is not in
    `done`; finished rows are dropped before any image is read."""
    source = ImageSource(allowed=(found.location, *job.allow_images_from), root=found.location,
                         storage_options=job.storage_options)
    if found.format == "images":
        ids = [posixpath.relpath(p, found.root) for p in batch.column("path").to_pylist()]
        images = batch.column("bytes").to_pylist()
        instructions = [None] * len(ids)
    else:
        ids = batch.column(job.id_column).to_pylist()
        images = batch.column(job.image_path_column or job.image_column).to_pylist()
        instructions = (batch.column(found.instruction_column).to_pylist() if found.instruction_column
                        else [None] * len(ids))
    text_ids = pa.array([None if i is None else str(i) for i in ids], pa.string())
    finished = pc.is_in(text_ids, value_set=done).to_pylist()
    rows = [_prepare_row(raw_id, image, instruction, job, source)
            for raw_id, image, instruction, skip in zip(ids, images, instructions, finished) if not skip]
    return pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA)


def _prepare_row(raw_id, image, instruction, job: CaptionJob, source: ImageSource) -> dict:
    row = {"id": None, "pixels": None, "width": None, "height": None, "prompt": None, "error": None}
    if raw_id is None:
        row["error"] = "missing id"
        return row
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        row["id"] = str(raw_id)
        row["error"] = f"id must be a string or an integer, got {type(raw_id).__name__}"
        return row
    row["id"] = str(raw_id)
    if instruction is None:
        instruction = job.instruction
    if not isinstance(instruction, str):
        row["error"] = f"instruction must be a string, got {type(instruction).__name__}"
        return row
    if not instruction.strip():
        row["error"] = "empty instruction"
        return row
    try:
        if job.image_path_column:
            picture = source.load(image, job.max_pixels)
        else:
            picture = decode_image(image, job.max_pixels)
    except ImageError as e:
        row["error"] = str(e)
        return row
    row.update(pixels=picture.tobytes(), width=picture.width, height=picture.height, prompt=instruction)
    return row


SAMPLE_SCAN_FACTOR = 8


def input_sample(job: CaptionJob, found: Input, n: int) -> list[dict]:
    """The first `n` good rows of the input as engine requests ({"id", "image", "prompt"}), read
    here without Ray: what `--budget auto` calibrates on. Bad rows are passed over; at most
    `SAMPLE_SCAN_FACTOR * n` rows are read."""
    fs, _ = job.filesystem(job.input)
    none = pa.array([], pa.string())
    requests, scanned = [], 0
    for batch in _input_batches(fs, found, n):
        prepared = prepare(batch, job=job, found=found, done=none)
        requests += [_request(row) for row in prepared.to_pylist() if row["error"] is None]
        scanned += batch.num_rows
        if len(requests) >= n or scanned >= SAMPLE_SCAN_FACTOR * n:
            break
    return requests[:n]


def _input_batches(fs, found: Input, n: int):
    if found.format == "images":
        for start in range(0, len(found.files), n):
            paths = found.files[start:start + n]
            yield pa.table({"path": paths, "bytes": pa.array([fs.cat_file(p) for p in paths], pa.binary())})
        return
    for path in found.files:
        with fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=n, columns=found.columns):
                yield pa.Table.from_batches([batch])


def _request(row: dict) -> dict:
    """A prepared row as an engine request."""
    return {"id": row["id"], "image": Image.frombytes("RGB", (row["width"], row["height"]), row["pixels"]),
            "prompt": row["prompt"]}


@ray.remote(num_cpus=0)
class ActorStats:
    """Per-actor counters the caption actors report to after each batch."""

    def __init__(self):
        self.actors: dict[str, dict] = {}

    def started(self, key: str, node: str, pid: int, load_s: float, engine: dict) -> None:
        entry = self.actors.setdefault(key, {"node": node, "pid": pid, "starts": 0, "load_s": [], "batches": 0,
                                             "rows": 0, "errors": 0, "prompt_tokens": 0, "output_tokens": 0,
                                             "kv_bytes": 0, "kv_bytes_full": 0, "engine_s": 0.0})
        entry.update(node=node, pid=pid, **engine)
        entry["starts"] += 1
        entry["load_s"].append(round(load_s, 3))

    def batch(self, key: str, numbers: dict) -> None:
        entry = self.actors[key]
        entry["batches"] += 1
        for name, value in numbers.items():
            entry[name] += value

    def snapshot(self) -> dict:
        return self.actors


def load_model(job: CaptionJob):
    """The job's (model, processor), on the GPU when its actors have one."""
    return load(job.model, device="cuda" if job.gpus_per_actor > 0 else None)


def build_llm(job: CaptionJob) -> LLM:
    """The job's engine: `max_num_seqs` sequences in flight, prompts up to what the context leaves.

    A batch of more rows than slots keeps the slots full (a finished row's slot takes the next
    row), so only each batch's last rows run with slots idle."""
    model, processor = load_model(job)
    context = model.config.get_text_config().max_position_embeddings
    engine = EngineConfig(kv_cache_memory=job.kv_cache_memory, max_num_seqs=job.max_num_seqs, max_tokens=job.max_tokens,
                          max_prompt_tokens=min(default_prompt_tokens(model), context - job.max_tokens))
    return LLM((model, processor), cache=CacheConfig(job.method, job.budget, **dict(job.cache_options)), engine=engine)


def engine_slots(llm: LLM) -> dict:
    """What an actor's engine packs: its slots, and the slots its KV budget would hold with a full cache."""
    engine = llm.engine
    return {"slots": engine.num_slots, "slot_bytes": engine.slot_size * engine.entry_bytes,
            "full_slots": engine.slots_for(CacheConfig("full", 1.0).policy), "kv_budget_bytes": engine.kv_budget_bytes}


def sampling(job: CaptionJob) -> SamplingParams:
    return SamplingParams(max_tokens=job.max_tokens, temperature=0.0)


class Captions:
    """One `LLM` and the caption step for a prepared batch. Rows `prepare` flagged keep their error;
    the others go to the engine one by one, so a request it refuses (a prompt over its limit, say)
    becomes that row's error while the rest run batched."""

    def __init__(self, job: CaptionJob):
        self.job, self.llm = job, build_llm(job)
        self.sampling = sampling(job)

    def __call__(self, batch: pa.Table) -> tuple[pa.Table, dict]:
        """The output rows, and the batch's numbers for the run's per-actor metrics."""
        rows = batch.to_pylist()
        out = [{"id": r["id"], "caption": None, "error": r["error"], "model": self.job.model,
                "method": self.job.method, "budget": float(self.job.budget), "prompt_tokens": None,
                "output_tokens": None, "kv_bytes": None, "latency_ms": None} for r in rows]
        engine, start, kv_full = self.llm.engine, time.perf_counter(), 0
        for i, row in enumerate(rows):
            if row["error"] is None:
                try:
                    engine.add_request(_request(row), self.sampling, request_id=i)
                except ValueError as e:
                    out[i]["error"] = f"refused by the engine: {e}"
        while engine.has_unfinished():
            for o in engine.step():
                if o.finish_reason == "error":
                    out[o.request_id]["error"] = f"refused by the engine: {o.error}"
                elif o.finished:
                    out[o.request_id].update(
                        caption=o.text, prompt_tokens=o.stats["prompt_tokens"], output_tokens=o.stats["output_tokens"],
                        kv_bytes=o.stats["kv_bytes"], latency_ms=round(1000 * (time.perf_counter() - start), 3))
                    kv_full += o.stats["kv_bytes_full"]
        done = [result for result in out if result["caption"] is not None]
        numbers = {
            "rows": len(out), "errors": len(out) - len(done), "engine_s": time.perf_counter() - start,
            "kv_bytes_full": kv_full, "prompt_tokens": sum(r["prompt_tokens"] for r in done),
            "output_tokens": sum(r["output_tokens"] for r in done), "kv_bytes": sum(r["kv_bytes"] for r in done),
        }
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA), numbers


class Captioner:
    """The actor-pool callable: `Captions` plus reporting to `ActorStats` after every batch."""

    def __init__(self, job: CaptionJob, stats):
        start = time.perf_counter()
        self.captions, self.stats = Captions(job), stats
        context = ray.get_runtime_context()
        self.key = context.get_actor_id()
        ray.get(stats.started.remote(self.key, context.get_node_id(), os.getpid(), time.perf_counter() - start,
                                     engine_slots(self.captions.llm)))

    def __call__(self, batch: pa.Table) -> pa.Table:
        table, numbers = self.captions(batch)
        ray.get(self.stats.batch.remote(self.key, numbers))
        return table


# --- The run --------------------------------------------------------------------------------


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


def _parquet_files(fs, root: str) -> list[str]:
    fs.invalidate_cache(root)  # s3fs caches listings; other processes have written since
    return sorted(f for f in fs.find(root) if f.endswith(".parquet")) if fs.exists(root) else []


def _read_files(fs, files: list[str], columns: list[str]) -> pa.Table:
    tables = []
    for path in files:
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table().select(columns)


def finished_ids(fs, root: str) -> pa.Array:
    """Ids in the output's complete files. Files without a readable footer (cut short) are deleted."""
    ids = []
    for path in _parquet_files(fs, root):
        try:
            with fs.open(path, "rb") as f:
                ids.append(pq.read_table(f, columns=["id"]).column("id"))
        except pa.ArrowInvalid:
            fs.rm(path)
    return pc.drop_null(pa.chunked_array(ids, pa.string()).combine_chunks())


def _execute(job: CaptionJob, found: Input, calibration: dict | None = None) -> dict:
    out_fs, out_root = job.filesystem(job.output)
    done = finished_ids(out_fs, out_root) if job.resume else pa.array([], pa.string())
    before = set(_parquet_files(out_fs, out_root))
    stats = ActorStats.remote()
    try:
        start = time.perf_counter()
        _write_captions(job, found, done, stats)
        wall = time.perf_counter() - start
        actors = ray.get(stats.snapshot.remote())
    finally:
        ray.kill(stats)
    new = [f for f in _parquet_files(out_fs, out_root) if f not in before]
    written = _read_files(out_fs, new, ["error", "prompt_tokens", "output_tokens", "kv_bytes", "latency_ms"])
    ids = _read_files(out_fs, _parquet_files(out_fs, out_root), ["id"]).column("id")
    metrics = _metrics(job, found, written, ids, len(done), wall, actors)
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
    in_fs, _ = job.filesystem(job.input)
    out_fs, out_root = job.filesystem(job.output)
    context = DataContext.get_current()
    context.enable_progress_bars = job.progress
    # Start only once the whole pool is up: work spreads over every actor, and a pool the cluster
    # cannot place fails with a timeout instead of waiting silently.
    context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    source = PyFileSystem(FSSpecHandler(in_fs))
    if found.format == "parquet":
        ds = ray.data.read_parquet(found.files, filesystem=source).select_columns(found.columns)
    else:
        ds = ray.data.read_binary_files(found.files, include_paths=True, filesystem=source)
    # Whole read blocks: the set of finished ids is hashed once per block, not once per batch.
    ds = ds.map_batches(prepare, batch_size=None, batch_format="pyarrow",
                        fn_kwargs={"job": job, "found": found, "done": done})
    # Blocks of one batch each, so every actor gets work however few and large the input files are.
    ds = ds.repartition(target_num_rows_per_block=job.batch_size)
    ds = ds.map_batches(Captioner, compute=ActorPoolStrategy(size=job.num_actors), batch_size=job.batch_size,
                        batch_format="pyarrow", num_cpus=job.cpus_per_actor, num_gpus=job.gpus_per_actor or None,
                        fn_constructor_kwargs={"job": job, "stats": stats}, udf_modifying_row_count=False)
    ds.write_parquet(out_root, filesystem=PyFileSystem(FSSpecHandler(out_fs)), min_rows_per_file=job.rows_per_file)


def _metrics(job: CaptionJob, found: Input, written: pa.Table, ids: pa.ChunkedArray, resumed: int, wall: float,
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
