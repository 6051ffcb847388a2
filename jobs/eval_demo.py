"""Score the demo VLM on test-split shapes scenes (greedy, full cache) and print JSON.

    HF_HUB_OFFLINE=1 python jobs/eval_demo.py --n 500 --seed 0
"""

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the bundled demo model's)")
    parser.add_argument("--n", type=int, default=500, help="number of test scenes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-blank", action="store_true", help="skip the blank-image control")
    args = parser.parse_args()
    import torch  # after parsing: --help answers at once

    from elastic_ray.models.demo_build import DEMO_DIR
    from elastic_ray.models.demo_quality import evaluate_demo

    torch.set_num_threads(args.threads)
    result = evaluate_demo(args.model or str(DEMO_DIR), n=args.n, seed=args.seed, batch_size=args.batch_size,
                           blank=not args.no_blank)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
