"""Train the bundled demo VLM from scratch on the shapes data set (2 CPU cores: 2287 s measured).

    python jobs/train_demo.py                      # writes elastic_ray/models/demo/
    python jobs/train_demo.py --out /tmp/demo --steps 300
"""

import argparse

OVERRIDES = {"steps": int, "batch_size": int, "lr": float, "questions_per_image": int, "seed": int, "threads": int,
             "log_every": int}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="output directory (HF format); default: the package's demo model folder")
    for name, kind in OVERRIDES.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=f"override the recipe's {name}")
    args = parser.parse_args()
    # torch after parsing: --help answers at once
    from elastic_ray.models.demo_build import DEMO_DIR
    from elastic_ray.models.demo_train import TrainConfig, train_demo

    cfg = TrainConfig(**{k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None})
    print(train_demo(args.out or str(DEMO_DIR), cfg, log=lambda line: print(line, flush=True)))


if __name__ == "__main__":
    main()
