"""Calibrate per-layer budgets: each layer's retention curve for a model and a method, as JSON.

    python jobs/calibrate_layers.py --model demo --method elastic-vl --samples 16 \\
        --out elastic_ray/eval/layer_budgets/demo-elastic-vl.json
    python jobs/calibrate_layers.py --model PATH --method h2o --samples 16 --out PATH/layer_budgets-h2o.json

The samples are training-split shapes scenes of the model's own data (`--scenes`; each as its caption,
description with demo-v2, and a question prompt), never the evaluation's test scenes. The file is what `--cache-option layer_budgets=FILE` (jobs/caption.py,
jobs/evaluate.py) and the server's `cache_options` read; the policy solves it for its own budget.
Criterion: elastic_ray/eval/layer_calibration.py.
"""

import argparse
import json
import time
from pathlib import Path

from elastic_ray.flags import parse_cache_option, refuse


def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="'demo', 'demo-v2', a local path or a hub id")
    parser.add_argument("--scenes", choices=["demo", "demo-v2"], default=None,
                        help="which demo model's training scenes; default: --model's when it names a demo model, "
                             "else demo")
    parser.add_argument("--method", default="elastic-vl", help="a method that scores its prompt: elastic, "
                                                               "elastic-vl or h2o")
    parser.add_argument("--cache-option", action="append", default=[], type=parse_cache_option, metavar="KEY=VALUE",
                        help="an option of the method (repeatable), as jobs/caption.py takes it")
    parser.add_argument("--criterion", choices=["mass", "output"], default="mass",
                        help="retention as the attention mass kept, or 1 - the attention output's relative error "
                             "(elastic_ray/eval/layer_calibration.py)")
    parser.add_argument("--samples", type=int, default=16,
                        help="training-split scenes (each two prompts, three with demo-v2)")
    parser.add_argument("--seed", type=int, default=0, help="the training scene stream")
    parser.add_argument("--device", default=None, help="default: cuda when available, else the CPU")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    args = parser.parse_args(argv)
    args.scenes = args.scenes or (args.model if args.model in ("demo", "demo-v2") else "demo")
    return parser, args


def main(argv=None) -> None:
    parser, args = parse_args(argv)
    from elastic_ray.config import CacheConfig

    options = dict(args.cache_option)
    if args.samples < 1:
        refuse(parser, f"--samples must be at least 1, got {args.samples}")
    try:
        policy = CacheConfig(args.method, 0.5, **options).policy
    except ValueError as error:
        refuse(parser, str(error))
    if policy.prompt_scores is None or policy.layer_budgets is not None:
        refuse(parser, f"{args.method} cannot be calibrated: it needs prompt scores and no layer_budgets of its own")

    import torch

    from elastic_ray.eval.layer_calibration import calibration_record, retention_curves
    from elastic_ray.eval.samples import shapes_samples
    from elastic_ray.models.loading import load

    model, processor = load(args.model, device=args.device or ("cuda" if torch.cuda.is_available() else None))
    samples = shapes_samples(args.samples, seed=args.seed, scenes=args.scenes, split="train")
    start = time.perf_counter()
    curves = retention_curves(model, processor, policy, samples, criterion=args.criterion)
    record = calibration_record(args.model, policy, options, samples, curves, criterion=args.criterion,
                                data=f"{args.scenes} shapes (train split)", seed=args.seed, seconds=round(time.perf_counter() - start, 1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}: {len(curves)} layers, {len(samples)} prompts")
    for budget in (0.2, 0.3, 0.5, 0.7):
        split = CacheConfig(args.method, budget, layer_budgets=str(out), **options).policy.layer_budgets
        print(f"budget {budget}: " + ("uniform" if split is None else " ".join(f"{b:.3f}" for b in split)))


if __name__ == "__main__":
    main()
