"""What the job has written: the output's Parquet files, the ids already captioned (resume), and
the check that an output folder may be written to."""

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from elastic_ray.pipeline.actor import OUTPUT_SCHEMA
from elastic_ray.pipeline.job import CaptionJob, JobConfigError


def check_output(job: CaptionJob) -> None:
    fs, out = job.filesystem(job.output)
    fs.invalidate_cache(out)
    if fs.exists(out) and not fs.isdir(out):
        raise JobConfigError(f"output {job.output} is a file; it must be a directory")
    if fs.exists(out) and fs.find(out) and not job.resume:
        raise JobConfigError(f"output {job.output} is not empty; pass --resume to finish it, "
                             "or choose a new output")


def parquet_files(fs, root: str) -> list[str]:
    fs.invalidate_cache(root)  # s3fs caches listings; other processes have written since
    return sorted(f for f in fs.find(root) if f.endswith(".parquet")) if fs.exists(root) else []


def read_files(fs, files: list[str], columns: list[str]) -> pa.Table:
    tables = []
    for path in files:
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table().select(columns)


def finished_ids(fs, root: str) -> pa.Array:
    """Ids in the output's complete files. Files without a readable footer (cut short) are deleted."""
    ids = []
    for path in parquet_files(fs, root):
        try:
            with fs.open(path, "rb") as f:
                ids.append(pq.read_table(f, columns=["id"]).column("id"))
        except pa.ArrowInvalid:
            fs.rm(path)
    return pc.drop_null(pa.chunked_array(ids, pa.string()).combine_chunks())
