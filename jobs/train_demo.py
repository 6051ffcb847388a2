"""Train the bundled demo VLM from scratch on the shapes data set (2 CPU cores: 2287 s measured).

    python jobs/train_demo.py                      # writes elastic_ray/models/demo/
    python jobs/train_demo.py --out /tmp/demo --steps 300
"""

import argparse

from elastic_ray.models.demo_build import DEMO_DIR
from elastic_ray.models.demo_train import TrainConfig, train_demo


def main() -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEMO_DIR), help="output directory (HF format)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--questions-per-image", type=int, default=defaults.questions_per_image)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--log-every", type=int, default=defaults.log_every)
    args = parser.parse_args()
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      questions_per_image=args.questions_per_image, seed=args.seed,
                      threads=args.threads, log_every=args.log_every)
    print(train_demo(args.out, cfg, log=lambda line: print(line, flush=True)))


if __name__ == "__main__":
    main()
