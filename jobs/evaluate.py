"""Fidelity sweep: every method x budget against the full cache (PPL, ROUGE-L) and the ground truth.

    python jobs/evaluate.py                          # the demo model on shapes test scenes, with ablations
    python jobs/evaluate.py --model /models/llava-1.5-7b-hf --data desc.parquet --samples 200 --ray

Writes OUT/results.json, OUT/results.md and one PNG per metric.
"""

import argparse
import time
from pathlib import Path

# torch and Ray (and elastic_ray's modules that import them) are imported where used, after the
# arguments parse, so that --help and a bad argument answer at once.

ABLATIONS = {"positions": ["compact"], "merge": [False], "offset": [5, 10, 50], "protect": [16]}
ABLATION_BUDGETS = [0.1, 0.2, 0.3, 0.5, 0.7, 0.9]


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="'demo', a local path or a hub id")
    parser.add_argument("--methods", default="full,elastic,h2o,streaming")
    parser.add_argument("--budgets", type=floats, default=[round(0.1 * i, 1) for i in range(1, 11)])
    parser.add_argument("--samples", type=int, default=100,
                        help="shapes: scenes (each a caption and a question sample); --data: rows")
    parser.add_argument("--data", default=None, help="Parquet with image, instruction and reference columns")
    parser.add_argument("--id-column", default="id")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--instruction-column", default="instruction")
    parser.add_argument("--reference-column", default="reference")
    parser.add_argument("--max-tokens", type=int, default=48, help="greedy output length (the paper used 1024)")
    parser.add_argument("--no-ablations", action="store_true", help="skip elastic's positions/merge/offset ablations")
    parser.add_argument("--ray", action="store_true", help="run the cells as parallel Ray tasks")
    parser.add_argument("--cpus-per-cell", type=float, default=1.0)
    parser.add_argument("--gpus-per-cell", type=float, default=0.0)
    parser.add_argument("--device", default=None, help="default: cuda when available, else the CPU")
    parser.add_argument("--out", default="out/eval")
    args = parser.parse_args(argv)
    import torch

    from elastic_ray.kv import METHODS

    args.device = args.device or ("cuda" if torch.cuda.is_available() else None)
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; allowed: {sorted(METHODS)}")
    if any(not 0 < b <= 1 for b in args.budgets):
        parser.error(f"budgets must be in (0, 1], got {args.budgets}")
    return args


def samples_of(args):
    from elastic_ray.eval.samples import parquet_samples, shapes_samples

    if args.data:
        return parquet_samples(args.data, args.samples, id_column=args.id_column, image_column=args.image_column,
                               instruction_column=args.instruction_column, reference_column=args.reference_column)
    return shapes_samples(args.samples)


def ray_runner(args):
    """Run cells as Ray tasks, each loading the model and the samples itself."""
    import ray

    from elastic_ray.eval.sweep import run_cell
    from elastic_ray.models.loading import load

    ray.init(include_dashboard=False)

    @ray.remote(num_cpus=args.cpus_per_cell, num_gpus=args.gpus_per_cell)
    def remote_cell(cell, full_outputs):
        model, processor = load(args.model, device=args.device)
        return run_cell(model, processor, cell, samples_of(args), args.max_tokens, full_outputs)[0]

    return lambda cells, full_outputs: ray.get([remote_cell.remote(c, full_outputs) for c in cells])


def main(argv=None) -> None:
    args = parse_args(argv)
    from elastic_ray.eval.results import write_results
    from elastic_ray.eval.sweep import grid, sweep
    from elastic_ray.models.loading import load

    model, processor = load(args.model, device=args.device)
    samples = samples_of(args)
    cells = grid(args.methods.split(","), args.budgets,
                 None if args.no_ablations or "elastic" not in args.methods else ABLATIONS, ABLATION_BUDGETS)
    start = time.perf_counter()
    def log(cell):
        print(f"{cell['label']:<28} budget {cell['budget']:.2f}  ppl {cell['ppl']:.4g}  rouge_l {cell['rouge_l']:.3f}  "
              f"accuracy {'n/a' if cell['accuracy'] is None else format(cell['accuracy'], '.3f')}", flush=True)

    print(f"{len(cells)} cells x {len(samples)} samples")
    results = sweep(model, processor, cells, samples, args.max_tokens, ray_runner(args) if args.ray else None, log)
    result = {"model": args.model, "data": args.data or "shapes (test split)", "samples": len(samples),
              "max_tokens": args.max_tokens, "wall_s": round(time.perf_counter() - start, 1), "cells": results}
    for path in write_results(result, Path(args.out)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
