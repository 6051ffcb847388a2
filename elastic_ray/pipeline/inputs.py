"""What the job reads: input discovery (Parquet shards or an image folder, local or s3://), its
schema and row count, and a sample of good rows read without Ray."""

import posixpath
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pyarrow.fs import FSSpecHandler, PyFileSystem

from elastic_ray.data.images import IMAGE_EXTENSIONS
from elastic_ray.pipeline.job import CaptionJob, JobConfigError
from elastic_ray.pipeline.prepare import prepare, to_request


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
        requests += [to_request(row) for row in prepared.to_pylist() if row["error"] is None]
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
