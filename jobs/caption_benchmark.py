"""The caption job against the bare engine on the same rows, interleaved: the job's rows/s as a share
of the engine's, its occupancy and its fixed cost.

    python jobs/caption_benchmark.py --rows 2048 --repeats 2 --batches-in-flight 1,4
    python jobs/caption_benchmark.py --rows 8192 --repeats 1 --out out/caption-benchmark-8192

Each repeat runs `jobs/engine_baseline.py` (one torch thread, as a 1-CPU actor has) and
`jobs/caption.py` once per --batches-in-flight value (one actor, no quality sample, no report), in an
order rotated from repeat to repeat, each in its own process, with the host's load average
before and after. It prints one JSON line per run, then a summary and writes both to
`<out>/benchmark.json`: per arm the median rows/s, and for each job arm its steady rows/s
(from the first row reaching the engine to the last captioned) and end-to-end rows/s over the
engine's, its occupancy, and its fixed cost (Ray start, actor start, first row).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).parents[1]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2048, help="demo rows, written to out/demo-shards-ROWS if missing")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batches-in-flight", default="4", help="comma-separated values, one job arm each")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None, help="where benchmark.json goes (default: out/caption-benchmark-ROWS)")
    return p


def engine_run(shards: str) -> dict:
    result = subprocess.run([sys.executable, "jobs/engine_baseline.py", "--input", shards, "--threads", "1"],
                            cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def job_run(shards: str, batches_in_flight: int, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="caption-benchmark-") as work:
        start = time.perf_counter()
        subprocess.run([sys.executable, "jobs/caption.py", "--input", shards, "--output", f"{work}/out",
                        "--quality-sample", "0", "--no-report", "--no-progress", "--num-actors", "1",
                        "--batch-size", str(batch_size), "--batches-in-flight", str(batches_in_flight)],
                       cwd=REPO, capture_output=True, text=True, check=True)
        process_s = time.perf_counter() - start
        metrics = json.loads(Path(f"{work}/out.metrics.json").read_text())
    actor, timings = metrics["actors"][0], metrics["timings"]
    return {"rows": metrics["rows"], "process_s": round(process_s, 3), "wall_s": metrics["wall_s"],
            "rows_per_s": metrics["rows_per_s"], "steady_rows_per_s": timings["steady_rows_per_s"],
            "occupancy": metrics["occupancy"], "wait_s": actor["wait_s"], "engine_s": actor["engine_s"],
            "actor_cpu_s": actor["cpu_s"], "intake_s": actor["intake_s"], "timings": timings}


def main() -> None:
    args = parser().parse_args()
    shards = f"out/demo-shards-{args.rows}"
    if not (REPO / shards).is_dir():
        from elastic_ray.data.shapes import write_shards

        write_shards(REPO / shards, args.rows, rows_per_shard=256)
    arms = ["engine"] + [f"job:{k}" for k in map(int, args.batches_in_flight.split(","))]
    runs = []
    for repeat in range(args.repeats):
        for arm in arms[repeat % len(arms):] + arms[:repeat % len(arms)]:
            load_before = os.getloadavg()[0]
            result = engine_run(shards) if arm == "engine" else \
                job_run(shards, int(arm.split(":")[1]), args.batch_size)
            run = {"arm": arm, "repeat": repeat, "load_before": round(load_before, 2),
                   "load_after": round(os.getloadavg()[0], 2), **result}
            print(json.dumps(run), flush=True)
            runs.append(run)
    engine = statistics.median(r["rows_per_s"] for r in runs if r["arm"] == "engine")
    summary = {"rows": args.rows, "repeats": args.repeats, "engine_rows_per_s": engine, "jobs": {}}
    for arm in arms[1:]:
        mine = [r for r in runs if r["arm"] == arm]
        steady = statistics.median(r["steady_rows_per_s"] for r in mine)
        end_to_end = statistics.median(r["rows_per_s"] for r in mine)
        summary["jobs"][arm] = {
            "steady_rows_per_s": steady, "steady_over_engine": round(steady / engine, 4),
            "rows_per_s": end_to_end, "end_to_end_over_engine": round(end_to_end / engine, 4),
            "occupancy": statistics.median(r["occupancy"] for r in mine),
            **{key: statistics.median(r["timings"][key] for r in mine)
               for key in ("ray_start_s", "actor_start_s", "first_row_s", "finish_s")},
        }
    summary["load_average"] = [min(r["load_before"] for r in runs), max(r["load_after"] for r in runs)]
    print(json.dumps(summary, indent=2))
    out = Path(args.out or f"out/caption-benchmark-{args.rows}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
