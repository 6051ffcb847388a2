"""What the job has written: the output's Parquet files, which of them are the job's own, the ids
already captioned (resume), and the check that an output folder may be written to.

The job's files are named by `CaptionFiles` (`captions-<write uuid>-<task>-<n>.parquet`, directly
under the output) and hold OUTPUT_SCHEMA's columns. Resume counts the ids of those files only;
one of them without a readable footer (a write cut short) is deleted, and every other file in the
output is left alone with a warning: its rows are not counted as captioned.
"""

import re
import warnings
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.datasource import FilenameProvider

from elastic_ray.pipeline.actor import OUTPUT_SCHEMA
from elastic_ray.pipeline.job import CaptionJob, JobConfigError

OUR_NAME = re.compile(r"captions-[0-9a-f]{32}-\d{6}-\d+\.parquet")
FOREIGN_EXAMPLES = 5


class CaptionFiles(FilenameProvider):
    """Names the job's output files so that resume can tell them from anyone else's."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"captions-{write_uuid}-{task_index:06d}.parquet"  # Ray adds "-<n>" before the extension


@dataclass
class OutputFiles:
    """The output's files: the job's complete ones, the job's cut short, and everything else."""

    ours: list[str] = field(default_factory=list)
    cut_short: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)


def check_output(job: CaptionJob) -> None:
    fs, out = job.filesystem(job.output)
    fs.invalidate_cache(out)
    if fs.exists(out) and not fs.isdir(out):
        raise JobConfigError(f"output {job.output} is a file; it must be a directory")
    if fs.exists(out) and fs.find(out) and not job.resume:
        raise JobConfigError(f"output {job.output} is not empty; pass --resume to finish it, "
                             "or choose a new output")


def output_files(fs, root: str) -> OutputFiles:
    """Every file under the output, sorted into the job's complete files, the job's files cut
    short (named as ours, no Parquet footer) and foreign files."""
    fs.invalidate_cache(root)  # s3fs caches listings; other processes have written since
    files = OutputFiles()
    if not fs.exists(root):
        return files
    for path in sorted(fs.find(root)):
        if path.rpartition("/")[0] != root.rstrip("/") or not OUR_NAME.fullmatch(path.rpartition("/")[2]):
            files.foreign.append(path)
            continue
        try:
            with fs.open(path, "rb") as f:
                schema = pq.read_schema(f)
        except pa.ArrowInvalid:
            files.cut_short.append(path)
            continue
        (files.ours if schema.remove_metadata().equals(OUTPUT_SCHEMA) else files.foreign).append(path)
    return files


def our_files(fs, root: str) -> list[str]:
    return output_files(fs, root).ours


def read_files(fs, files: list[str], columns: list[str]) -> pa.Table:
    tables = []
    for path in files:
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table().select(columns)


def finished_ids(fs, root: str) -> pa.Array:
    """Ids in the job's complete files. The job's files cut short are deleted; other files are
    left with a warning, their rows not counted."""
    files = output_files(fs, root)
    for path in files.cut_short:
        fs.rm(path)
    if files.foreign:
        names = ", ".join(files.foreign[:FOREIGN_EXAMPLES]) + (" ..." if len(files.foreign) > FOREIGN_EXAMPLES else "")
        warnings.warn(f"{len(files.foreign)} files in the output were not written by this job and are left as they "
                      f"are; their rows do not count as captioned: {names}", stacklevel=2)
    return pc.drop_null(read_files(fs, files.ours, ["id"]).column("id").combine_chunks())
