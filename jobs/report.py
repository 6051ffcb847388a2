"""Cost and throughput report from run directories: the caption job, the benchmark, the evaluation, the Serve load test.

    python jobs/report.py out/captions out/eval out/benchmark --out out/report --hourly-price 2.5

Writes OUT/report.json (every figure with the input file and field it follows from), OUT/report.md,
OUT/report.html (self-contained) and the plots as PNG.
"""

import argparse

from elastic_ray.report import DEFAULT_HOURLY_PRICE, build, read_runs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="a caption output folder or its .metrics.json, or a folder with benchmark.json, "
                        "results.json or load.json")
    p.add_argument("--out", required=True, help="folder to write the report to")
    p.add_argument("--hourly-price", type=float, default=None,
                   help=f"USD per actor-hour, per GPU-hour on GPU runs (default: {DEFAULT_HOURLY_PRICE}, assumed)")
    args = p.parse_args(argv)
    if args.hourly_price is not None and not args.hourly_price > 0:
        p.error(f"--hourly-price must be positive, got {args.hourly_price}")
    try:
        runs = read_runs(args.runs)
    except (OSError, ValueError) as e:
        p.error(str(e))
    print(f"wrote {build(runs, args.out, args.hourly_price)}")


if __name__ == "__main__":
    main()
