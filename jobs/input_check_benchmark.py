"""What the caption job's checks before Ray cost: `check()` (every file's schema, the id pass for
duplicates, the pieces) on a generated Parquet input, beside reading only the files' footers
(what any run must do to count rows) and reading every row's image bytes once (what the run reads
anyway). Interleaved repeats; wall and CPU seconds, and Arrow's peak allocation once the first
check has run (writing the input allocates one file's table at a time).

    python jobs/input_check_benchmark.py --rows 100000 --files 100
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from elastic_ray.pipeline.job import CaptionJob
from elastic_ray.pipeline.run import check


def write_input(folder: str, rows: int, files: int, image_bytes: int) -> None:
    rng = np.random.default_rng(0)
    per_file = rows // files
    for f in range(files):
        ids = [f"shard-{f:05d}-row-{i:07d}" for i in range(per_file)]
        images = [rng.bytes(image_bytes) for _ in range(per_file)]
        pq.write_table(pa.table({"id": ids, "image": pa.array(images, pa.binary())}),
                       os.path.join(folder, f"part-{f:05d}.parquet"))


def footers(folder: str) -> int:
    return sum(pq.read_metadata(os.path.join(folder, name)).num_rows for name in sorted(os.listdir(folder)))


def images(folder: str) -> int:
    return sum(pq.read_table(os.path.join(folder, name), columns=["image"]).num_rows
               for name in sorted(os.listdir(folder)))


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--files", type=int, default=100)
    p.add_argument("--image-bytes", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        write_input(folder, args.rows, args.files, args.image_bytes)
        job = CaptionJob(input=folder, output=os.path.join(folder, "..", "unused-output"))
        arms = {"check": lambda: check(job), "footers only": lambda: footers(folder),
                "read the images once": lambda: images(folder)}
        times: dict[str, list] = {name: [] for name in arms}
        times["check"].append(timed(arms["check"]))
        peak = pa.default_memory_pool().max_memory()
        for repeat in range(args.repeats):
            for name, fn in arms.items():
                if repeat or name != "check":
                    times[name].append(timed(fn))
    result = {"rows": args.rows, "files": args.files, "image_bytes": args.image_bytes,
              "arrow_peak_mb_after_check": round(peak / 2**20, 1)}
    for name, runs in times.items():
        result[name] = {"wall_s": round(float(np.median([w for w, _ in runs])), 3),
                        "cpu_s": round(float(np.median([c for _, c in runs])), 3)}
    result["check_over_image_read"] = round(result["check"]["wall_s"] / result["read the images once"]["wall_s"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
