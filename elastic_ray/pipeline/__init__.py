"""The Ray Data captioning job: shards in, exactly one caption row per input row out, resumable.

    read (Parquet shards, WebDataset tar shards or a folder of images, local or s3://)
      -> prepare on CPU tasks (decode and validate the image, resolve the instruction)
      -> caption on an actor pool, one `LLM` per actor
      -> write_parquet

A bad row never fails the job: it is written with `error` set and a null caption. Resume reads
the ids in the job's own complete output files and skips them; a file of the job's cut short by
a kill has no Parquet footer and is deleted first; other files are left alone. `run` writes
`<output>.metrics.json` (measured values).

    job.py      the settings and the checks before Ray starts
    inputs.py   the input checked before Ray: format, files, schemas, ids, row count, pieces
    reader.py   the read stage (a Ray Data datasource), and a sample of good rows without Ray
    prepare.py  the CPU stage: decode and validate each row
    actor.py    the caption actor
    output.py   the written files and resume
    run.py      the run itself
    metrics.py  the measured numbers and the summary line
"""

from elastic_ray.pipeline.actor import Captioner, Captions, build_llm, load_model, sampling
from elastic_ray.pipeline.inputs import Input, inspect_input
from elastic_ray.pipeline.job import CaptionJob, JobConfigError
from elastic_ray.pipeline.metrics import summary
from elastic_ray.pipeline.output import finished_ids
from elastic_ray.pipeline.prepare import prepare
from elastic_ray.pipeline.reader import input_sample, read_input
from elastic_ray.pipeline.run import check, run

__all__ = ["CaptionJob", "Captioner", "Captions", "Input", "JobConfigError", "build_llm", "check", "finished_ids",
           "input_sample", "inspect_input", "load_model", "prepare", "read_input", "run", "sampling", "summary"]
