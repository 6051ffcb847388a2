"""Throughput at one KV memory budget: generate() in static batches vs the engine (full, elastic 0.5, 0.2).

    python jobs/benchmark.py --quick                  # CPU: a ~110 M-parameter LLaVA-1.5 shape
    python jobs/benchmark.py --requests 512 --max-tokens 128 --full-sequences 32   # GPU: the 7B shape, bf16

The model has random weights (throughput needs no trained ones) unless `--model` names a
local checkpoint or "demo".
The KV budget is given as the number of full-cache sequences it holds (`--full-sequences`) or in
bytes (`--kv-budget-bytes`). Writes OUT/benchmark.json and prints a Markdown table.
"""

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the scaled-down shape, for CPUs")
    parser.add_argument("--model", default=None, help="a local model path or 'demo' instead of random weights")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (EOS ignored)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--full-sequences", type=int, default=4, help="KV budget: room for this many full-cache sequences")
    budget.add_argument("--kv-budget-bytes", type=int, help="KV budget in bytes")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", default="out/benchmark", help="run directory for benchmark.json")
    args = parser.parse_args()
    import torch  # after parsing: --help answers at once

    from elastic_ray.benchmark import format_table, full_sequence_bytes, random_llava_15, run_benchmark
    from elastic_ray.models.loading import load

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    if args.model is None:
        shape = "quick" if args.quick else "llava-1.5-7b"
        model, processor = random_llava_15(shape, dtype, args.device)
    else:
        model, processor = load(args.model, dtype=dtype, device=args.device)
    kv_budget = args.kv_budget_bytes or args.full_sequences * full_sequence_bytes(model, processor, args.max_tokens)

    result = run_benchmark(model, processor, num_requests=args.requests, max_tokens=args.max_tokens,
                           kv_budget_bytes=kv_budget)
    result["model"] = args.model or f"random LLaVA-1.5 ({'quick' if args.quick else '7B'} shape)"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(result, indent=2))
    print(f"device: {result['device']}  KV budget: {kv_budget:,} bytes  workload: {result['workload']}")
    print(format_table(result))
    print(f"wrote {out / 'benchmark.json'}")


if __name__ == "__main__":
    main()
