"""Throughput at equal KV memory: generate() in static batches vs the engine (full, elastic; eager, compiled).

    python jobs/benchmark.py --shape quick                       # CPU: a ~110 M-parameter LLaVA-1.5 shape
    python jobs/benchmark.py --shape bandwidth --arms b,d,f      # CPU: decode bound by reading the cache
    python jobs/benchmark.py --model demo --max-num-seqs 16 --full-sequences 64   # per-step cost, 16 slots
    python jobs/benchmark.py --model demo --max-num-seqs 16 --full-sequences 64 --arms g,h   # async output?
    python jobs/benchmark.py --device cuda                       # GPU: the LLaVA-1.5-7B shape, bf16

The model has random weights (throughput needs no trained ones) unless `--model` names a local
checkpoint or "demo". KV budgets are given as the number of full-cache sequences each holds
(`--full-sequences 2,4,8`: a sweep) or in bytes (`--kv-budget-bytes`). Arms: a generate(), b engine
full, c elastic 0.5, d elastic 0.2, e full compiled, f elastic 0.2 compiled; g and h are d with async
output on and off (`EngineConfig.async_output`; b-f take the device's default). Writes
OUT/benchmark.json and prints a Markdown table.
"""

import argparse
import json
from pathlib import Path

# On a GPU: 624 + 256 tokens and 40 GB of KV memory, so that the full cache gets ~86 slots and
# Elastic Cache 0.2 ~431, with enough requests to fill the larger engine; one round (a GPU is not shared).
GPU_DEFAULTS = dict(shape="llava-1.5-7b", requests=512, max_tokens=256, kv_budget_bytes=40 * 10**9, arms="a,e,f",
                    rounds=1)
CPU_DEFAULTS = dict(shape="quick", requests=48, max_tokens=32, kv_budget_bytes=None, arms="a,b,c,d,e,f", rounds=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--shape", help="random-weight shape (default: quick on CPU, 7B on GPU)")
    parser.add_argument("--quick", action="store_true", help="same as --shape quick")
    parser.add_argument("--model", default=None, help="a local model path or 'demo' instead of random weights")
    parser.add_argument("--requests", type=int)
    parser.add_argument("--max-tokens", type=int, help="tokens generated per request (EOS ignored)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--full-sequences", default=None,
                        help="KV budgets: room for this many full-cache sequences, comma-separated (default 4)")
    budget.add_argument("--kv-budget-bytes", type=int, help="one KV budget in bytes")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="cap on every engine's slots")
    parser.add_argument("--arms", default=None, help="which arms, by letter (default: a-f on CPU, a,e,f on GPU)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3 on CPU, 1 on GPU)")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16, float16 (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", default="out/benchmark", help="run directory for benchmark.json")
    args = parser.parse_args()
    import torch  # after parsing: --help answers at once

    from elastic_ray.benchmark import ARMS, SHAPES, format_table, full_sequence_bytes, random_llava_15, run_benchmark
    from elastic_ray.models.loading import load

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.shape is not None and args.shape not in SHAPES:
        parser.error(f"--shape must be one of {', '.join(sorted(SHAPES))}")
    gpu = args.device.startswith("cuda")
    defaults = GPU_DEFAULTS if gpu else CPU_DEFAULTS
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    shape = "quick" if args.quick else args.shape or defaults["shape"]
    if args.model is None:
        model, processor = random_llava_15(shape, dtype, args.device)
    else:
        model, processor = load(args.model, dtype=dtype, device=args.device)
    max_tokens = args.max_tokens or defaults["max_tokens"]
    if args.kv_budget_bytes or (args.full_sequences is None and defaults["kv_budget_bytes"]):
        budgets = [args.kv_budget_bytes or defaults["kv_budget_bytes"]]
    else:
        per_sequence = full_sequence_bytes(model, processor, max_tokens)
        budgets = [int(k) * per_sequence for k in (args.full_sequences or "4").split(",")]
    keys = (args.arms or defaults["arms"]).split(",")
    arms = [arm for arm in ARMS if arm.key in keys]

    result = run_benchmark(model, processor, num_requests=args.requests or defaults["requests"], max_tokens=max_tokens,
                           kv_budgets=budgets, arms=arms, rounds=args.rounds or defaults["rounds"],
                           max_num_seqs=args.max_num_seqs, keep_engines=not gpu,
                           log=lambda line: print(line, flush=True))
    result["model"] = args.model or f"random LLaVA-1.5 ({shape} shape)"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(result, indent=2))
    print(f"device: {result['device']}  model: {result['model']}  workload: {result['workload']}")
    print(format_table(result))
    print(f"wrote {out / 'benchmark.json'}")


if __name__ == "__main__":
    main()
