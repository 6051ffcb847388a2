"""Train a bundled demo VLM from scratch on its shapes data set; seeded and resumable.

    python jobs/train_demo.py                          # demo (v1): writes elastic_ray/demo/v1/
    python jobs/train_demo.py --config demo-v2 --threads 1 --out /tmp/demo-v2
    python jobs/train_demo.py --config demo-v2 --out /tmp/pilot --steps 300   # a shorter run of the recipe

Checkpoints go to --checkpoint-dir (default: <out>-checkpoints) every --checkpoint-every
seconds; the same command run again continues from the last one. Measured: demo (v1), 2287 s
on 2 CPU cores.
"""

import argparse
from dataclasses import replace
from pathlib import Path

OVERRIDES = {"steps": int, "batch_size": int, "lr": float, "warmup": int, "seed": int, "threads": int,
             "log_every": int, "checkpoint_every_s": float}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo", help="the model and its recipe: demo or demo-v2")
    parser.add_argument("--out", help="output directory (HF format); default: the model's folder in the package")
    parser.add_argument("--checkpoint-dir", help="default: <out>-checkpoints")
    for name, kind in OVERRIDES.items():
        flag = "--checkpoint-every" if name == "checkpoint_every_s" else "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, type=kind, help=f"override the recipe's {name}")
    args = parser.parse_args()
    from elastic_ray.demo.train import CONFIGS, train_demo  # torch after parsing: --help answers at once

    if args.config not in CONFIGS:
        parser.error(f"--config must be one of {sorted(CONFIGS)}, got {args.config!r}")
    spec, cfg = CONFIGS[args.config]
    cfg = replace(cfg, **{k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None})
    out = Path(args.out or spec.out_dir)
    checkpoints = Path(args.checkpoint_dir or f"{out}-checkpoints")
    print(train_demo(spec, cfg, out, checkpoints, log=lambda line: print(line, flush=True)))


if __name__ == "__main__":
    main()
