"""The Ray Data captioning job: shards in, exactly one caption row per input row out, resumable.

    read (Parquet shards or a folder of images, local or s3://)
      -> prepare on CPU tasks (decode and validate the image, resolve the instruction)
      -> caption on an actor pool, one `LLM` per actor
      -> write_parquet

A bad row never fails the job: it is written with `error` set and a null caption. Resume reads
the ids already in the output's complete files and skips them; a file cut short by a kill has
no Parquet footer and is deleted first. `run` writes `<output>.metrics.json` (measured values).

    job.py      the settings and the checks before Ray starts
    inputs.py   input discovery, schema and row count; a sample of good rows
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
