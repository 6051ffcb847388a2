"""Caption images with a VLM on Ray Data: Parquet or WebDataset shards or an image folder in, Parquet captions out.

    python jobs/caption.py                    # demo-v2 and its demo shards, local Ray, CPU
    python jobs/caption.py --method h2o --budget auto --target-rouge 0.9
    python jobs/caption.py --input s3://bucket/shards --output s3://bucket/captions \\
        --model llava-hf/llava-1.5-7b-hf --num-actors 8 --gpus-per-actor 1 --resume
    ray job submit --working-dir . -- python jobs/caption.py --input /abs/shards --output /abs/out

Arguments are parsed before torch and Ray are imported: `--help` and bad arguments answer at once.
"""

import argparse
import os

from elastic_ray.flags import add_engine_flags, engine_settings, refuse
from elastic_ray.pipeline.job import INPUT_FORMATS, CaptionJob, JobConfigError

DEMO_INPUTS = {"demo": "out/demo-shards", "demo-v2": "out/demo-v2-shards"}  # each demo model's own test scenes
DEMO_ROWS, DEMO_ROWS_PER_SHARD = 256, 64


def write_demo_shards(model: str) -> str:
    """The demo input of a demo model: DEMO_ROWS of its test scenes, written once."""
    path = DEMO_INPUTS[model]
    if not os.path.isdir(path):
        from elastic_ray.data.shapes import write_shards
        from elastic_ray.data.shapes_v2 import iter_detailed_scenes

        stream = iter_detailed_scenes(0, "test") if model == "demo-v2" else None
        write_shards(path, DEMO_ROWS, rows_per_shard=DEMO_ROWS_PER_SHARD, stream=stream)
    return path


def budget(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number in (0, 1] or 'auto', got {text!r}") from None


def calibrate(job: CaptionJob, requests: list[dict]) -> dict:
    """Auto-budget on the job's own rows: the smallest budget whose greedy captions score
    `job.target_rouge` ROUGE-L against the full cache's. Runs as a Ray task (see `run`)."""
    from elastic_ray.eval.calibrate import choose_budget
    from elastic_ray.eval.samples import Sample
    from elastic_ray.pipeline.captions import load_model

    model, processor = load_model(job)
    samples = [Sample(r["id"], r["image"], r["prompt"], "", "reference") for r in requests]
    return choose_budget(model, processor, samples, job.method, job.target_rouge, job.max_tokens,
                         options=dict(job.cache_options))


def score(captions: list[str], references: list[str]) -> dict:
    """The quality sample's captions against the full cache's (see `run`)."""
    from elastic_ray.eval.spot_check import fidelity

    return fidelity(captions, references)


def parser() -> argparse.ArgumentParser:
    d = CaptionJob(input="", output="")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", help=f"Parquet shards, WebDataset tar shards or images: a file, folder or s3:// "
                                   f"prefix (default: the --model demo model's shards, else demo-v2's, written to "
                                   f"{' or '.join(DEMO_INPUTS.values())} if missing)")
    p.add_argument("--input-format", choices=("auto", *INPUT_FORMATS), default=d.input_format,
                   help="auto: parquet if the input holds .parquet files, else webdataset if .tar, else images")
    p.add_argument("--output", default="out/captions", help="output folder or s3:// prefix")
    p.add_argument("--model", default=d.model, help="'demo-v2' (default), 'demo', a local path or a hub id")
    add_engine_flags(p, d, budget_type=budget,
                     budget_help="fraction of KV entries kept, in (0, 1]; 'auto': the smallest that meets "
                                 "--target-rouge on the input's first --calibration-rows good rows")
    p.add_argument("--target-rouge", type=float, default=d.target_rouge,
                   help="with --budget auto: the ROUGE-L F1 against the full cache's captions to meet")
    p.add_argument("--calibration-rows", type=int, default=d.calibration_rows, help="rows --budget auto runs on")
    p.add_argument("--quality-sample", type=int, default=d.quality_sample,
                   help="rows of the input also captioned with the full cache, to score this run's captions "
                        "against (ROUGE-L, degenerate captions); 0 turns it off")
    p.add_argument("--min-rouge", type=float, default=d.min_rouge,
                   help="under this ROUGE-L on the quality sample the job warns before captioning")
    p.add_argument("--instruction", default=d.instruction, help="for rows without one")
    p.add_argument("--num-actors", type=int, default=d.num_actors)
    p.add_argument("--gpus-per-actor", type=float, default=d.gpus_per_actor)
    p.add_argument("--cpus-per-actor", type=float, default=d.cpus_per_actor)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per call to a caption actor")
    p.add_argument("--batches-in-flight", type=int, default=d.batches_in_flight,
                   help="batches a caption actor runs at once, sharing its engine's slots")
    p.add_argument("--resume", action="store_true", help="finish a run into a non-empty output")
    p.add_argument("--allow-duplicate-ids", action="store_true",
                   help="caption every row of an id that occurs more than once; later ones as '<id>#<file>#<row>'")
    p.add_argument("--id-column", default=d.id_column, help="rows with a null id get '<file>#<row>'")
    p.add_argument("--image-column", default=d.image_column,
                   help="encoded image bytes, or Hugging Face's {bytes, path} image struct")
    p.add_argument("--image-path-column", help="image paths or URIs, relative to the input, instead of bytes")
    p.add_argument("--instruction-column", help="default: 'instruction' when the input has it (for tar shards: the "
                                                "field of KEY.json)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// paths")
    p.add_argument("--allow-images-from", action="append", default=[], metavar="PREFIX",
                   help="a folder or URL prefix image paths may also be read from (repeatable)")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels)
    p.add_argument("--rows-per-file", type=int, default=d.rows_per_file, help="output rows per file (minimum)")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress line")
    p.add_argument("--no-report", action="store_true", help="skip the report (default: written to <output>.report/)")
    p.add_argument("--report-with", action="append", default=[], metavar="RUN_DIR",
                   help="an evaluation (for quality) or benchmark folder the report includes (repeatable)")
    return p


def main(argv=None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.input is None:
        args.input = write_demo_shards(args.model if args.model in DEMO_INPUTS else CaptionJob.model)
    settings = engine_settings(args)
    settings["cache_options"] = tuple(settings["cache_options"].items())
    job = CaptionJob(
        **settings, input=args.input, output=args.output, model=args.model,
        target_rouge=args.target_rouge, calibration_rows=args.calibration_rows, quality_sample=args.quality_sample,
        min_rouge=args.min_rouge, instruction=args.instruction, num_actors=args.num_actors,
        gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size,
        batches_in_flight=args.batches_in_flight, resume=args.resume, input_format=args.input_format,
        allow_duplicate_ids=args.allow_duplicate_ids, id_column=args.id_column, image_column=args.image_column,
        image_path_column=args.image_path_column, instruction_column=args.instruction_column,
        endpoint_url=args.endpoint_url, allow_images_from=tuple(args.allow_images_from),
        max_pixels=args.max_pixels, rows_per_file=args.rows_per_file, address=args.address,
        progress=not args.no_progress,
    )
    from elastic_ray.pipeline.console import DroppedLines
    from elastic_ray.pipeline.metrics import summary
    from elastic_ray.pipeline.run import run
    from elastic_ray.report.inputs import read_runs

    try:
        extra = read_runs(args.report_with)
    except (OSError, ValueError) as e:
        refuse(p, f"--report-with: {e}")
    try:
        with DroppedLines():
            metrics = run(job, calibrate, score)
    except JobConfigError as e:
        refuse(p, str(e))
    if metrics is None:
        print(f"{job.output} already holds a caption for every input row; nothing to do (metrics and report "
              "left as they are)", flush=True)
        return
    if "budget_calibration" in metrics:
        c = metrics["budget_calibration"]
        met = (f"ROUGE-L {c['rouge_l']:.3f} >= {c['target_rouge']}" if c["rouge_l"] is not None
               else f"no budget below 1.0 met ROUGE-L {c['target_rouge']}")
        print(f"budget auto: {c['method']} at {c['budget']} ({met} on {c['rows']} rows, {c['wall_s']:.1f} s)",
              flush=True)
    print(summary(metrics, job), flush=True)
    if not args.no_report:
        from elastic_ray.report import caption_report

        print(f"report {caption_report(metrics, job.metrics_path, job.output, extra)}", flush=True)


if __name__ == "__main__":
    main()
