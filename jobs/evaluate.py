"""Fidelity sweep: every method x budget against the full cache (PPL, ROUGE-L) and the ground truth.

    python jobs/evaluate.py --preset readme          # the README's numbers: first demo model, 2 seeds, ablations
    python jobs/evaluate.py --preset readme-v2       # the same comparison on demo-v2's scenes
    python jobs/evaluate.py --preset readme --model PATH        # the same sweep on another model
    python jobs/evaluate.py --preset layers          # per-layer budgets against the uniform split
    python jobs/evaluate.py --preset layers --model demo-v2     # the same on demo-v2 (calibrate it first)
    python jobs/evaluate.py --methods "full,elastic,h2o recent_ratio=0" --budgets 0.2,0.5 --samples 20
    python jobs/evaluate.py --model /models/llava-1.5-7b-hf --data desc.parquet --samples 200 --ray

A method is a variant `METHOD [KEY=VALUE ...]` (its options as --cache-option reads them); lists
are comma-separated. Writes OUT/results.json, OUT/results.md, OUT/summary.md (the README's
tables) and one PNG per metric.
"""

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path

# torch and elastic_ray's modules that import it are imported where used, after the arguments
# parse, so that --help and a bad argument answer at once.

PRESET_METHOD = "elastic-vl"
LAYER_BUDGETS = "elastic_ray/eval/layer_budgets"  # calibration files, MODEL-METHOD.json
PRESETS = {
    # The README's Evaluation section: each method and the paper's H2O at the budgets issue 17's
    # targets name; then at 0.2 and 0.5 each option of elastic-vl alone on the published method,
    # each left out of the preset, and the published method's own ablations. One torch thread a
    # process (the same numbers on any machine), two processes.
    "readme": {
        "model": "demo",
        "methods": "elastic,elastic-vl,h2o,h2o recent_ratio=0,streaming",
        "budgets": [0.2, 0.3, 0.5, 0.7],
        "ablations": ",".join([
            "elastic protect_text=true", "elastic importance=mean", "elastic importance=instruction",
            "elastic assign=key", "elastic offset=1048576", "elastic-vl protect_text=false", "elastic-vl importance=sum",
            "elastic-vl importance=mean", "elastic-vl assign=position", "elastic-vl offset=25",
            "elastic merge=false", "elastic positions=compact",
        ]),
        "ablation_budgets": [0.2, 0.5],
        "samples": 40,
        "seeds": [0, 1],
        "threads": 1,
        "workers": 2,
    },
    # The README's per-layer budgets: elastic-vl and H2O, uniform against the splits calibrated for
    # the model by jobs/calibrate_layers.py with each criterion (the files named below, MODEL-METHOD.json
    # for "mass", MODEL-METHOD-output.json for "output"; calibrate another model first).
    "layers": {
        "methods": ",".join(f"{method},{method} layer_budgets={LAYER_BUDGETS}/{{model}}-{method}.json,"
                            f"{method} layer_budgets={LAYER_BUDGETS}/{{model}}-{method}-output.json"
                            for method in ("elastic-vl", "h2o")),
        "model": "demo",
        "budgets": [0.2, 0.3, 0.5, 0.7],
        "samples": 40,
        "seeds": [0, 1],
        "threads": 1,
        "workers": 2,
        "folder": "elastic_ray/eval/layer_results",
    },
}
PRESETS["readme-v2"] = {**PRESETS["readme"], "model": "demo-v2"}  # the same comparison on demo-v2's own scenes


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="a named sweep (flags given as well override it); 'readme' writes to "
                             "elastic_ray/eval/demo_results, 'layers' to elastic_ray/eval/layer_results (under "
                             "them, a folder per model other than demo)")
    parser.add_argument("--model", default="demo-v2", help="'demo-v2' (default), 'demo', a local path or a hub id")
    parser.add_argument("--scenes", choices=["demo", "demo-v2"], default=None,
                        help="which demo model's test scenes the shapes samples are (demo-v2: a caption, a "
                             "description and a question per scene); default: --model's when it names a demo "
                             "model, else demo")
    parser.add_argument("--methods", default="full,elastic,h2o,streaming", help="comma-separated variants")
    parser.add_argument("--budgets", type=floats, default=[round(0.1 * i, 1) for i in range(1, 11)])
    parser.add_argument("--ablations", default="", help="comma-separated variants run at --ablation-budgets")
    parser.add_argument("--ablation-budgets", type=floats, default=None, help="default: --budgets")
    parser.add_argument("--samples", type=int, default=100,
                        help="per seed; shapes: scenes (each a caption and a question sample); --data: rows")
    parser.add_argument("--seeds", type=ints, default=[0],
                        help="shapes: the scene streams; --data: seed k takes rows [k*samples, (k+1)*samples)")
    parser.add_argument("--data", default=None, help="Parquet with image, instruction and reference columns")
    parser.add_argument("--data-kind", choices=["reference", "caption", "vqa"], default="reference",
                        help="what --data's references are: 'caption' or 'vqa' are shapes ground truth, scored "
                             "for accuracy too (e.g. the demo shards jobs/caption.py writes)")
    parser.add_argument("--id-column", default="id")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--instruction-column", default="instruction")
    parser.add_argument("--reference-column", default="reference")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="greedy output length (the paper used 1024); default: 128 with demo-v2 scenes (its "
                             "descriptions), else 48")
    parser.add_argument("--no-ppl", action="store_true", help="skip teacher forcing: no PPL, half the work")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    parser.add_argument("--workers", type=int, default=1,
                        help="local processes the cells run in, each loading the model once (the full cache runs "
                             "first, here)")
    parser.add_argument("--ray", action="store_true", help="run the cells as parallel Ray tasks")
    parser.add_argument("--cpus-per-cell", type=float, default=1.0)
    parser.add_argument("--gpus-per-cell", type=float, default=0.0)
    parser.add_argument("--device", default=None, help="default: cuda when available, else the CPU")
    parser.add_argument("--out", default=None, help="default: out/eval, or the preset's folder")
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**{k: v for k, v in PRESETS[preset].items()})
    args = parser.parse_args(argv)
    model_name = args.model if args.model == "demo" else Path(args.model).name
    args.methods = args.methods.replace("{model}", model_name)  # a preset's calibration files
    args.methods, args.ablations = _variants(parser, args.methods), _variants(parser, args.ablations)
    if any(not 0 < b <= 1 for b in args.budgets + (args.ablation_budgets or [])):
        parser.error(f"budgets must be in (0, 1], got {args.budgets}")
    args.scenes = args.scenes or (args.model if args.model in ("demo", "demo-v2") else "demo")
    args.max_tokens = args.max_tokens or (128 if args.scenes == "demo-v2" and not args.data else 48)
    if args.out is None:
        results = Path(getattr(args, "folder", "elastic_ray/eval/demo_results"))
        args.out = str(results if args.model == "demo" else results / model_name) if preset else "out/eval"
    return args


def _variants(parser, text: str) -> list[str]:
    from elastic_ray.config import CacheConfig
    from elastic_ray.eval.sweep import variant

    specs = [s.strip() for s in text.split(",") if s.strip()]
    for spec in specs:
        try:
            method, options = variant(spec)
            CacheConfig(method, 1.0 if method == "full" else 0.5, **dict(options))
        except (argparse.ArgumentTypeError, ValueError) as error:
            parser.error(f"{spec!r}: {error}")
    return specs


def samples_of(args, seed: int):
    from elastic_ray.eval.samples import parquet_samples, shapes_samples

    if args.data:
        return parquet_samples(args.data, args.samples, offset=seed * args.samples, kind=args.data_kind,
                               id_column=args.id_column, image_column=args.image_column,
                               instruction_column=args.instruction_column, reference_column=args.reference_column)
    return shapes_samples(args.samples, seed=seed, scenes=args.scenes)


def ray_runner(args, seed: int):
    """Run cells as Ray tasks, each loading the model and the samples itself."""
    import ray

    from elastic_ray.eval.sweep import run_cell
    from elastic_ray.models.loading import load

    if not ray.is_initialized():
        ray.init(include_dashboard=False)

    @ray.remote(num_cpus=args.cpus_per_cell, num_gpus=args.gpus_per_cell)
    def remote_cell(cell, full_outputs):
        model, processor = load(args.model, device=args.device)
        return run_cell(model, processor, cell, samples_of(args, seed), args.max_tokens, full_outputs,
                        score_ppl=not args.no_ppl)[0]

    return lambda cells, full_outputs: ray.get([remote_cell.remote(c, full_outputs) for c in cells])


_WORKER: dict = {}  # a --workers process: its args, model and the current seed's samples


def _start_worker(args) -> None:
    import torch

    from elastic_ray.models.loading import load

    if args.threads:
        torch.set_num_threads(args.threads)
    _WORKER.update(args=args, model=load(args.model, device=args.device))


def _worker_cell(seed: int, cell, full_outputs: list[str]) -> dict:
    from elastic_ray.eval.sweep import run_cell

    args = _WORKER["args"]
    if _WORKER.get("seed") != seed:
        _WORKER.update(seed=seed, samples=samples_of(args, seed))
    model, processor = _WORKER["model"]
    return run_cell(model, processor, cell, _WORKER["samples"], args.max_tokens, full_outputs,
                    score_ppl=not args.no_ppl)[0]


def pool_runner(pool: ProcessPoolExecutor, seed: int):
    """Run cells in the pool's processes, logged in order as they finish."""

    def run_cells(cells, full_outputs):
        results = []
        for result in pool.map(_worker_cell, repeat(seed), cells, repeat(full_outputs)):
            log(result)
            results.append(result)
        return results

    return run_cells


def log(cell: dict) -> None:
    from elastic_ray.eval.results import format_score

    scores = "  ".join(f"{score} {format_score(cell, score)}" for score in ("ppl", "rouge_l", "accuracy"))
    print(f"{cell['label']:<32} budget {cell['budget']:.2f}  {scores}", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from elastic_ray.eval.results import combine_seeds, write_results
    from elastic_ray.eval.summary import summary
    from elastic_ray.eval.sweep import grid, sweep
    from elastic_ray.models.loading import load

    args.device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load(args.model, device=args.device)
    cells = grid(args.methods, args.budgets, args.ablations, args.ablation_budgets)
    pool = ProcessPoolExecutor(args.workers, multiprocessing.get_context("spawn"), _start_worker, (args,)) \
        if args.workers > 1 and not args.ray else None
    start = time.perf_counter()
    runs = {}
    for seed in args.seeds:
        samples = samples_of(args, seed)
        print(f"seed {seed}: {len(cells)} cells x {len(samples)} samples", flush=True)
        runner = ray_runner(args, seed) if args.ray else pool_runner(pool, seed) if pool else None
        runs[seed] = sweep(model, processor, cells, samples, args.max_tokens, runner, log, score_ppl=not args.no_ppl)
    if pool:
        pool.shutdown()
    result = {"model": args.model, "data": args.data or f"{args.scenes} shapes (test split)", "samples": len(samples),
              "seeds": args.seeds, "max_tokens": args.max_tokens, "wall_s": round(time.perf_counter() - start, 1),
              "methods": [m for m in args.methods if m != "full"], "cells": combine_seeds(runs)}
    for path in write_results(result, Path(args.out), {"summary.md": summary(result, PRESET_METHOD)}):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
