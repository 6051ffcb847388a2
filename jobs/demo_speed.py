"""Time per caption row of demo models on the engine (full cache), interleaved, CPU and wall time.

    python jobs/demo_speed.py --model demo --model demo-v2=/tmp/demo-v2 --rows 32 --reps 3

Each arm captions the same number of its own test scenes ("Describe the image.") with EOS
ignored, so every row generates exactly --tokens tokens (v1 and v2 captions share a grammar:
about 24 tokens): the figure is the architecture's cost, untrained weights time the same.
Arms run in turn, --reps times; prints each arm's median seconds per row and its ratio to the first.
"""

import argparse
import json
import statistics
import time

import torch

from elastic_ray import LLM, EngineConfig, SamplingParams
from elastic_ray.data.shapes import CAPTION_INSTRUCTION
from elastic_ray.demo.build import SPECS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="NAME or NAME=DIR (NAME: demo, demo-v2)")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    arms = {}
    for arg in args.model:
        name, _, path = arg.partition("=")
        spec = SPECS[name]
        llm = LLM(path or name, engine=EngineConfig(max_tokens=args.tokens))
        requests = [{"image": s.image, "prompt": CAPTION_INSTRUCTION} for s in spec.scenes(args.rows, split="test")]
        arms[arg] = (llm, requests)
    sampling = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    times: dict[str, dict[str, list[float]]] = {arm: {"cpu": [], "wall": []} for arm in arms}
    for arm, (llm, requests) in arms.items():  # warm-up
        llm.generate(requests[:2], sampling)
    for _ in range(args.reps):
        for arm, (llm, requests) in arms.items():
            wall, cpu = time.perf_counter(), time.process_time()
            outs = llm.generate(requests, sampling)
            assert all(len(o.token_ids) == args.tokens for o in outs)
            times[arm]["cpu"].append((time.process_time() - cpu) / args.rows)
            times[arm]["wall"].append((time.perf_counter() - wall) / args.rows)
    first = next(iter(arms))
    result = {arm: {f"{kind}_s_per_row": statistics.median(t[kind]) for kind in ("cpu", "wall")} for arm, t in times.items()}
    for arm in result:
        for kind in ("cpu", "wall"):
            result[arm][f"{kind}_ratio"] = result[arm][f"{kind}_s_per_row"] / result[first][f"{kind}_s_per_row"]
    print(json.dumps({"rows": args.rows, "tokens": args.tokens, "reps": args.reps, "threads": args.threads,
                      "arms": result}, indent=2))


if __name__ == "__main__":
    main()
