"""Load an OpenAI-compatible endpoint (jobs/serve.py): N chat requests at concurrency C per cache policy.

    python jobs/serve.py --model demo &
    python jobs/load_test.py --url http://127.0.0.1:8000 --requests 128 --concurrency 16 --max-tokens 32 \\
        --cache full:1.0 --cache elastic:0.5 --output out/load

Each request sends a different test-split shapes image as a data: URL with "Describe the image.",
greedy, with `ignore_eos` so that every request generates exactly --max-tokens tokens and the
policies do equal work. A policy's run is preceded by --warmup requests (not measured, they also
create its engine). A 429 counts as rejected and is not retried. Writes `<output>/load.json`
(the measured numbers, the command, the server's /healthz with its device, this client's host
and its load average before and after, which shows other work sharing the machine)
and `<output>/requests.jsonl` (one line a request), and prints one line a policy.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# httpx, numpy and the shapes data (PIL, pyarrow) are imported where used, after the arguments
# parse, so that --help answers at once.


def cache_arg(value: str) -> tuple[str, float]:
    method, _, budget = value.partition(":")
    return method, float(budget or 1.0)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--requests", type=int, default=64, help="measured requests per cache policy")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests before each policy's run")
    p.add_argument("--cache", type=cache_arg, action="append", metavar="METHOD:BUDGET",
                   help="a cache policy to measure (repeatable; default: full:1.0 and elastic:0.5)")
    p.add_argument("--output", default="out/load", help="run directory to write")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    return p


def data_urls(n: int) -> list[str]:
    from elastic_ray.data.shapes import make_scenes, png_bytes

    return [f"data:image/png;base64,{base64.b64encode(png_bytes(s.image)).decode()}"
            for s in make_scenes(n, seed=0, split="test")]


async def one(client: httpx.AsyncClient, model: str, url: str, method: str, budget: float, max_tokens: int) -> dict:
    from elastic_ray.data.shapes import CAPTION_INSTRUCTION

    body = {"model": model, "temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True,
            "method": method, "budget": budget,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": CAPTION_INSTRUCTION}]}]}
    start = time.perf_counter()
    response = await client.post("/v1/chat/completions", json=body)
    row = {"status": response.status_code, "latency_ms": (time.perf_counter() - start) * 1000}
    if response.status_code == 200:
        answer = response.json()
        row.update(completion_tokens=answer["usage"]["completion_tokens"],
                   prompt_tokens=answer["usage"]["prompt_tokens"], **answer["kv_cache"])
    else:
        row["error"] = response.text[:500]
    return row


async def run_policy(client, model, urls, method, budget, args) -> tuple[dict, list[dict]]:
    """Warm up, then send every url once with at most `concurrency` in flight; returns (summary, rows)."""
    import numpy as np

    for url in urls[: args.warmup]:
        await one(client, model, url, method, budget, args.max_tokens)
    gate = asyncio.Semaphore(args.concurrency)

    async def gated(url):
        async with gate:
            return await one(client, model, url, method, budget, args.max_tokens)

    start = time.perf_counter()
    rows = await asyncio.gather(*(gated(url) for url in urls))
    wall = time.perf_counter() - start
    ok = [r for r in rows if r["status"] == 200]
    latency = np.array([r["latency_ms"] for r in ok]) if ok else np.zeros(1)
    summary = {
        "method": method, "budget": budget, "requests": len(rows), "ok": len(ok),
        "rejected": sum(r["status"] == 429 for r in rows), "errors": sum(r["status"] not in (200, 429) for r in rows),
        "wall_s": round(wall, 3), "requests_per_s": round(len(ok) / wall, 3),
        "output_tokens_per_s": round(sum(r["completion_tokens"] for r in ok) / wall, 1),
        "latency_ms": {"p50": round(float(np.percentile(latency, 50)), 1),
                       "p99": round(float(np.percentile(latency, 99)), 1),
                       "mean": round(float(latency.mean()), 1), "max": round(float(latency.max()), 1)},
        "kv_bytes_mean": round(float(np.mean([r["kv_bytes"] for r in ok])), 1) if ok else None,
        "kv_bytes_full_mean": round(float(np.mean([r["kv_bytes_full"] for r in ok])), 1) if ok else None,
    }
    return summary, [{"method": method, "budget": budget, "index": i, **r} for i, r in enumerate(rows)]


async def measure(args) -> dict:
    import httpx

    caches = args.cache or [("full", 1.0), ("elastic", 0.5)]
    urls = data_urls(args.requests)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout, limits=limits) as client:
        model = (await client.get("/v1/models")).raise_for_status().json()["data"][0]["id"]
        results, rows = [], []
        for method, budget in caches:
            summary, policy_rows = await run_policy(client, model, urls, method, budget, args)
            results.append(summary)
            rows += policy_rows
        server = (await client.get("/healthz")).raise_for_status().json()
    return {"model": model, "server": server, "results": results, "rows": rows}


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if min(args.requests, args.concurrency, args.max_tokens) < 1 or args.warmup < 0:
        parser().error("--requests, --concurrency and --max-tokens must be positive, --warmup non-negative")
    load_before = os.getloadavg()
    measured = asyncio.run(measure(args))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "kind": "serve_load",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.executable).name, *sys.argv],
        "config": {"url": args.url, "requests": args.requests, "concurrency": args.concurrency,
                   "max_tokens": args.max_tokens, "warmup": args.warmup, "ignore_eos": True, "temperature": 0.0},
        "model": measured["model"],
        "device": measured["server"]["device"],
        "server": measured["server"],
        "client": {"host": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count(),
                   "python": platform.python_version(),
                   "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()}},
        "results": measured["results"],
    }
    (out / "load.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(out / "requests.jsonl", "w") as f:
        for row in measured["rows"]:
            f.write(json.dumps(row) + "\n")
    for r in measured["results"]:
        print(f"{r['method']} {r['budget']}: {r['ok']}/{r['requests']} ok ({r['rejected']} rejected, {r['errors']} "
              f"errors) in {r['wall_s']} s: {r['requests_per_s']} requests/s, {r['output_tokens_per_s']} tokens/s, "
              f"latency p50 {r['latency_ms']['p50']} ms, p99 {r['latency_ms']['p99']} ms", flush=True)
    print(f"wrote {out / 'load.json'}", flush=True)


if __name__ == "__main__":
    main()
