"""The bare engine on a caption job's rows, without Ray: the yardstick for the job's rows/s.

    python jobs/engine_baseline.py --input out/demo-shards --threads 1

Reads and prepares the rows as the job does, builds the same engine (`max_num_seqs` sequences
in flight), then times one `generate` over every good row and prints JSON.
"""

import argparse
import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from elastic_ray.pipeline import CaptionJob, build_llm, inspect_input, prepare, sampling


def main() -> None:
    d = CaptionJob(input="", output="")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", default="out/demo-shards", help="local Parquet shards with id and image columns")
    p.add_argument("--model", default=d.model)
    p.add_argument("--method", default=d.method)
    p.add_argument("--budget", type=float, default=d.budget)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a job actor gets its num_cpus)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    job = CaptionJob(input=args.input, output="", model=args.model, method=args.method, budget=args.budget,
                     max_tokens=args.max_tokens, max_num_seqs=args.max_num_seqs)
    found = inspect_input(job)
    table = pa.concat_tables(pq.read_table(f, columns=found.columns) for f in found.files)
    rows = prepare(table, job=job, found=found, done=pa.array([], pa.string())).to_pylist()
    requests = [{"image": Image.frombytes("RGB", (r["width"], r["height"]), r["pixels"]), "prompt": r["prompt"]}
                for r in rows if r["error"] is None]
    start = time.perf_counter()
    llm = build_llm(job)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    outputs = llm.generate(requests, sampling(job))
    seconds = time.perf_counter() - start
    tokens = sum(o.stats["output_tokens"] for o in outputs)
    print(json.dumps({"rows": len(outputs), "threads": args.threads, "max_num_seqs": args.max_num_seqs,
                      "load_s": round(load_s, 3), "generate_s": round(seconds, 3),
                      "rows_per_s": round(len(outputs) / seconds, 3), "output_tokens": tokens,
                      "output_tokens_per_s": round(tokens / seconds, 3)}))


if __name__ == "__main__":
    main()
