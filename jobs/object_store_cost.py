"""What moving the caption job's batches through Ray's object store costs, for each side of the
processor: decoded images (the processor then runs in the caption actor) or the processor's tensors
(it runs on CPU workers, the job's choice).

    python jobs/object_store_cost.py --input out/demo-shards --rows 256 --batch-size 64

Reads and prepares the rows as the job's read and CPU stages do, then on a local Ray (127.0.0.1)
puts each batch in the object store from the driver and has a 1-CPU actor (one torch thread, as a
caption actor) get it and turn every row into the engine's request: `process`'s tensors unpacked,
or the decoded image through the processor. Prints JSON: per form the bytes a row, the put and the
get in ms a row, and the actor's ms a row to make the requests, with its CPU time.
"""

import argparse
import json


def parser() -> argparse.ArgumentParser:
    from elastic_ray.pipeline.job import CaptionJob

    d = CaptionJob(input="", output="")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", default="out/demo-shards", help="the job's input (local)")
    p.add_argument("--model", default=d.model)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--repeats", type=int, default=3, help="passes over the batches; the median pass counts")
    return p


def consumer_class():
    import ray

    @ray.remote(num_cpus=1)
    class Consumer:
        """A caption actor's intake: get a batch, then each row as the engine's request."""

        def __init__(self, job):
            import torch

            from elastic_ray.pipeline.prepare import processor_and_limit

            torch.set_num_threads(1)
            self.job, self.processor, self.limit = job, *processor_and_limit(job.model, job.max_tokens)

        def intake(self, wrapped: list, form: str) -> dict:
            import time

            import ray

            from elastic_ray.models.prompts import prepare_request
            from elastic_ray.pipeline.prepare import to_request, unpack

            start, cpu = time.perf_counter(), time.process_time()
            table = ray.get(wrapped[0])
            got = time.perf_counter()
            rows = [r for r in table.to_pylist() if r["error"] is None]
            if form == "processed":
                requests = [unpack(r) for r in rows]
            else:
                requests = [prepare_request(self.processor, to_request(r), self.limit) for r in rows]
            return {"get_s": got - start, "request_s": time.perf_counter() - got,
                    "cpu_s": time.process_time() - cpu, "rows": len(requests)}

    return Consumer


def main() -> None:
    args = parser().parse_args()
    import statistics
    import time

    import pyarrow as pa
    import ray

    from elastic_ray.pipeline.inputs import inspect_input
    from elastic_ray.pipeline.job import CaptionJob
    from elastic_ray.pipeline.prepare import prepare, process
    from elastic_ray.pipeline.reader import read_rows

    job = CaptionJob(input=args.input, output="", model=args.model, batch_size=args.batch_size)
    found = inspect_input(job)
    decoded = pa.concat_tables(prepare(rows, job=job, found=found)
                               for rows in read_rows(job, found, pa.array([], pa.string()))).slice(0, args.rows)
    forms = {"decoded": decoded, "processed": process(decoded, job=job)}
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2,
             logging_level="WARNING")
    try:
        consumer = consumer_class().remote(job)
        result = {"rows": decoded.num_rows, "batch_size": args.batch_size}
        for name, table in forms.items():
            passes = []
            for _ in range(args.repeats):
                total = {"put_s": 0.0, "get_s": 0.0, "request_s": 0.0, "cpu_s": 0.0}
                for start in range(0, table.num_rows, args.batch_size):
                    batch = table.slice(start, args.batch_size).combine_chunks()
                    began = time.perf_counter()
                    ref = ray.put(batch)
                    total["put_s"] += time.perf_counter() - began
                    measured = ray.get(consumer.intake.remote([ref], name))
                    for key in ("get_s", "request_s", "cpu_s"):
                        total[key] += measured[key]
                    del ref
                passes.append(total)
            per_row = 1000 / table.num_rows
            result[name] = {"bytes_per_row": round(table.nbytes / table.num_rows),
                            **{f"{key[:-2]}_ms_per_row": round(statistics.median(p[key] for p in passes) * per_row, 3)
                               for key in ("put_s", "get_s", "request_s", "cpu_s")}}
        print(json.dumps(result))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
