"""Cost and throughput report from run directories: the caption job, the benchmark, the evaluation, the Serve load test.

    python jobs/report.py out/captions out/eval out/benchmark --out out/report --gpu-hourly-price 2.5

Writes OUT/report.json (every figure with the input file and field it follows from), OUT/report.md,
OUT/report.html (self-contained) and the plots as PNG.
"""

import argparse

from elastic_ray.report import DEFAULT_PRICES, build, read_runs  # no torch, no Ray, no matplotlib yet


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="a caption output folder or its .metrics.json, or a folder with benchmark.json, "
                        "results.json or load.json")
    p.add_argument("--out", required=True, help="folder to write the report to")
    p.add_argument("--gpu-hourly-price", type=float, default=None,
                   help=f"USD per GPU-hour (default: {DEFAULT_PRICES['GPU']}, assumed)")
    p.add_argument("--cpu-hourly-price", type=float, default=None,
                   help=f"USD per CPU-hour, one core (default: {DEFAULT_PRICES['CPU']}, assumed)")
    args = p.parse_args(argv)
    for flag, price in (("--gpu-hourly-price", args.gpu_hourly_price), ("--cpu-hourly-price", args.cpu_hourly_price)):
        if price is not None and not price > 0:
            p.error(f"{flag} must be positive, got {price}")
    try:
        runs = read_runs(args.runs)
    except (OSError, ValueError) as e:
        p.error(str(e))
    print(f"wrote {build(runs, args.out, args.gpu_hourly_price, args.cpu_hourly_price)}")


if __name__ == "__main__":
    main()
