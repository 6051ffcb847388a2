"""The bare engine on a caption job's rows, without Ray: the yardstick for the job's rows/s.

    python jobs/engine_baseline.py --input out/demo-shards --threads 1

Reads and prepares the rows as the job's read and CPU stages do (decode, then the model's processor),
builds the same engine (`max_num_seqs` sequences in flight), then times one `generate` over every
good row's prepared request and prints JSON: `generate_s` and `rows_per_s` (the engine alone),
`process_ms_per_row` (the CPU stage the job runs on CPU workers: the processor, the prompt check
and packing), and `pack_ms_per_row` / `unpack_ms_per_row` (what moving a processed row through
Ray's object store adds: packing it on a CPU worker; reading it from its Arrow batch and
unpacking it in the caption actor).
"""

import argparse
import json


def parser() -> argparse.ArgumentParser:
    from elastic_ray.pipeline.job import CaptionJob

    d = CaptionJob(input="", output="")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", default="out/demo-shards", help="local Parquet shards with id and image columns")
    p.add_argument("--model", default=d.model)
    p.add_argument("--method", default=d.method)
    p.add_argument("--budget", type=float, default=d.budget)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a job actor gets its num_cpus)")
    return p


def main() -> None:
    args = parser().parse_args()
    import time

    import pyarrow as pa
    import torch

    from elastic_ray.pipeline.captions import build_engine, sampling
    from elastic_ray.pipeline.inputs import inspect_input
    from elastic_ray.pipeline.job import CaptionJob
    from elastic_ray.pipeline.prepare import pack, prepare, process, unpack
    from elastic_ray.pipeline.reader import read_rows

    torch.set_num_threads(args.threads)
    job = CaptionJob(input=args.input, output="", model=args.model, method=args.method, budget=args.budget,
                     max_tokens=args.max_tokens, max_num_seqs=args.max_num_seqs)
    found = inspect_input(job)
    decoded = pa.concat_tables(prepare(rows, job=job, found=found)
                               for rows in read_rows(job, found, pa.array([], pa.string())))
    process(decoded.slice(0, 1), job=job)  # loads the processor: not part of its cost per row
    start = time.perf_counter()
    processed = process(decoded, job=job)
    process_s = time.perf_counter() - start
    start = time.perf_counter()
    requests = [unpack(r) for r in processed.to_pylist() if r["error"] is None]
    unpack_s = time.perf_counter() - start
    start = time.perf_counter()
    for request in requests:
        pack(request)
    pack_s = time.perf_counter() - start
    start = time.perf_counter()
    engine = build_engine(job)
    load_s = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    outputs = engine.generate(requests, sampling(job))
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    tokens = sum(o.stats["output_tokens"] for o in outputs)
    per_row = 1000 / len(requests)
    print(json.dumps({"rows": len(outputs), "threads": args.threads, "max_num_seqs": args.max_num_seqs,
                      "load_s": round(load_s, 3), "generate_s": round(seconds, 3), "cpu_s": round(cpu_s, 3),
                      "rows_per_s": round(len(outputs) / seconds, 3), "output_tokens": tokens,
                      "output_tokens_per_s": round(tokens / seconds, 3),
                      "process_ms_per_row": round(process_s * 1000 / processed.num_rows, 3),
                      "pack_ms_per_row": round(pack_s * per_row, 3), "unpack_ms_per_row": round(unpack_s * per_row, 3)}))


if __name__ == "__main__":
    main()
