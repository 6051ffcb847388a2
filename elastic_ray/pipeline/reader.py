"""The read stage: one Ray Data read task per piece of the input, each yielding the rows the job
captions in one schema whatever the format, with finished rows dropped before any image is read.

    id           the row's id (see `inputs`: derived for rows without one, renamed for duplicates)
    image        encoded image bytes, or null
    image_path   a path or URI to read the image from instead (resolved by `ImageSource`), or null
    instruction  the row's own instruction, or null for the job's default
    error        what was wrong with the record itself (a bad tar member), or null

`read_piece` works without Ray; `input_sample` uses it for a sample of good rows.
"""

from functools import partial
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import Dataset, Datasource, ReadTask
from ray.data.block import BlockMetadata

from elastic_ray.data import webdataset
from elastic_ray.pipeline.inputs import Input, Layout, Piece, Shards, row_ids
from elastic_ray.pipeline.job import CaptionJob
from elastic_ray.pipeline.prepare import prepare, to_request

ROW_SCHEMA = pa.schema([("id", pa.string()), ("image", pa.large_binary()), ("image_path", pa.string()),
                        ("instruction", pa.string()), ("error", pa.string())])
BATCH_ROWS = 256


def read_piece(layout: Layout, shards: Shards, piece: Piece, done: pa.Array,
               batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """The piece's rows in ROW_SCHEMA tables of at most `batch_rows`, less those whose id is in `done`."""
    if layout.format == "images":
        ids = pa.array([shards.source(p) for p in piece.paths], pa.string())
        keep = _unfinished(ids, done)
        urls = [_url(layout, p) for p in piece.paths]
        for start in range(0, len(ids), batch_rows):
            rows = slice(start, start + batch_rows)
            if keep[rows].any():
                yield _rows(ids[rows], image_path=pa.array(urls[rows], pa.string())).filter(keep[rows])
        return
    with shards.open(piece.file) as f:
        if layout.format == "parquet":
            yield from _parquet_rows(layout, piece, pq.ParquetFile(f), done, batch_rows)
        else:
            yield from _webdataset_rows(layout, piece, f, done, batch_rows)


def _parquet_rows(layout: Layout, piece: Piece, file: pq.ParquetFile, done: pa.Array,
                  batch_rows: int) -> Iterator[pa.Table]:
    ids = file.read_row_groups(piece.row_groups, columns=[layout.id_column]).column(0)
    ids = row_ids(ids, piece.source, piece.start, piece.renames)
    keep = _unfinished(ids, done)
    if not keep.any():
        return
    columns = [c for c in (layout.image_column, layout.instruction) if c is not None]
    bounds = np.cumsum([0] + [file.metadata.row_group(g).num_rows for g in piece.row_groups])
    for group, offset, end in zip(piece.row_groups, bounds[:-1], bounds[1:]):
        if not keep[offset:end].any():
            continue  # a row group whose rows are all captioned: its images are never read
        for batch in file.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns):
            rows = slice(offset, offset + batch.num_rows)
            offset += batch.num_rows
            if keep[rows].any():
                yield _parquet_batch(layout, batch, ids[rows]).filter(keep[rows])


def _parquet_batch(layout: Layout, batch: pa.RecordBatch, ids: pa.Array) -> pa.Table:
    image = batch.column(layout.image_column)
    image_path = None
    if layout.image_kind == "path":
        image, image_path = None, image
    elif layout.image_kind == "struct":  # Hugging Face's Image: the bytes if present, else the path
        fields = {image.type.field(i).name for i in range(image.type.num_fields)}
        image, image_path = (pc.struct_field(image, name) if name in fields else None for name in ("bytes", "path"))
        if image is not None and image_path is not None:
            image_path = pc.if_else(pc.is_null(image), image_path, pa.scalar(None, image_path.type))
    instruction = batch.column(layout.instruction) if layout.instruction else None
    return _rows(ids, image, image_path, instruction)


def _webdataset_rows(layout: Layout, piece: Piece, fileobj, done: pa.Array, batch_rows: int) -> Iterator[pa.Table]:
    tar, samples = webdataset.index(fileobj)
    ids = row_ids(webdataset.keys(samples), piece.source, 0, piece.renames)
    keep = _unfinished(ids, done)
    for start in range(0, len(samples), batch_rows):
        chosen = [i for i in range(start, min(start + batch_rows, len(samples))) if keep[i]]
        images, instructions, errors = [], [], []
        for i in chosen:
            image, meta, error = webdataset.load(tar, samples[i])
            instruction = meta.get(layout.instruction)
            if error is None and instruction is not None and not isinstance(instruction, str):
                image, error = None, f"{layout.instruction!r} in {samples[i].json.name} must be a string, " \
                                     f"got {type(instruction).__name__}"
            images.append(image)
            instructions.append(instruction if isinstance(instruction, str) else None)
            errors.append(error)
        if chosen:
            yield _rows(ids.take(pa.array(chosen, pa.int64())), pa.array(images, pa.large_binary()),
                        instruction=pa.array(instructions, pa.string()), error=pa.array(errors, pa.string()))


def _rows(ids: pa.Array, image=None, image_path=None, instruction=None, error=None) -> pa.Table:
    n = len(ids)
    columns = [ids, image, image_path, instruction, error]
    return pa.Table.from_arrays([pa.nulls(n, f.type) if c is None else c.cast(f.type)
                                 for c, f in zip(columns, ROW_SCHEMA)], schema=ROW_SCHEMA)


def _unfinished(ids: pa.Array, done: pa.Array) -> np.ndarray:
    """Which ids are not in `done`: the finished set hashed once per piece."""
    if len(done) == 0:
        return np.ones(len(ids), bool)
    return ~pc.is_in(ids, value_set=done).to_numpy(zero_copy_only=False)


def _url(layout: Layout, path: str) -> str:
    """A path on the input's filesystem as `ImageSource` reads it: with the input's protocol."""
    return f"{layout.location.split('://', 1)[0]}://{path}" if "://" in layout.location else path


class InputDatasource(Datasource):
    """The input as a Ray Data datasource: a read task per piece."""

    def __init__(self, job: CaptionJob, found: Input, done: pa.Array):
        super().__init__()
        self.found, self.shards = found, Shards.of(job, found)
        self.done = ray.put(done)  # once in the object store, not once per task

    def estimate_inmemory_data_size(self) -> int | None:
        sizes = [p.bytes for p in self.found.pieces]
        return sum(sizes) if None not in sizes else None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        return [ReadTask(partial(_read_task, self.found.layout, self.shards, piece, self.done),
                         BlockMetadata(num_rows=piece.rows, size_bytes=piece.bytes, exec_stats=None,
                                       input_files=(piece.file,) if piece.file else None),
                         schema=ROW_SCHEMA, per_task_row_limit=per_task_row_limit)
                for piece in self.found.pieces]


def _read_task(layout: Layout, shards: Shards, piece: Piece, done) -> Iterator[pa.Table]:
    yield from read_piece(layout, shards, piece, ray.get(done))


def read_input(job: CaptionJob, found: Input, done: pa.Array) -> Dataset:
    """The input's rows not yet captioned (ids not in `done`), as a Ray Dataset in ROW_SCHEMA."""
    return ray.data.read_datasource(InputDatasource(job, found, done))


def read_rows(job: CaptionJob, found: Input, done: pa.Array, batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """Every piece's rows in input order, read here without Ray."""
    shards = Shards.of(job, found)
    for piece in found.pieces:
        yield from read_piece(found.layout, shards, piece, done, batch_rows)


SAMPLE_SCAN_FACTOR = 8


def input_sample(job: CaptionJob, found: Input, n: int) -> list[dict]:
    """The first `n` good rows of the input as engine requests ({"id", "image", "prompt"}), read
    here without Ray: what `--budget auto` calibrates on. Bad rows are passed over; at most
    `SAMPLE_SCAN_FACTOR * n` rows are read."""
    requests, scanned = [], 0
    for batch in read_rows(job, found, pa.array([], pa.string()), batch_rows=n):
        requests += [to_request(row) for row in prepare(batch, job=job, found=found).to_pylist()
                     if row["error"] is None]
        scanned += batch.num_rows
        if len(requests) >= n or scanned >= SAMPLE_SCAN_FACTOR * n:
            break
    return requests[:n]
