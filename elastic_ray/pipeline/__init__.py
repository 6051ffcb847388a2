"""The Ray Data captioning job: shards in, exactly one caption row per input row out, resumable.

    read (Parquet shards, WebDataset tar shards or a folder of images, local or s3://)
      -> prepare on CPU tasks (decode and validate the image, resolve the instruction, run the
         model's processor and check the prompt's length)
      -> caption on an actor pool, one engine loop per actor fed by several batches at once
      -> write_parquet

A bad row never fails the job: it is written with `error` set and a null caption. Resume reads
the ids in the job's own complete output files and skips them; a file of the job's cut short by
a kill has no Parquet footer and is deleted first; other files are left alone. `run` writes
`<output>.metrics.json` (measured values).

    job.py      the settings and the checks before Ray starts
    inputs.py   the input checked before Ray: format, files, schemas, ids, row count, pieces
    reader.py   the read stage (a Ray Data datasource), and a sample of good rows without Ray
    prepare.py  the CPU stages: decode and validate each row, then the model's processor
    actor.py    the caption actor as Ray Data runs it, and its counters (no model code)
    captions.py the caption step: one engine loop fed by several batches at once
    sample.py   the quality sample, measured inside a caption actor
    output.py   the written files and resume
    run.py      the run itself
    progress.py the one progress line
    metrics.py  the measured numbers and the summary line

Import from the modules: this package imports nothing, so `jobs/caption.py` parses its arguments
before Ray and torch load.
"""
