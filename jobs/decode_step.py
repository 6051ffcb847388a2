"""A decode step of one engine version against another's: the demo model, 16 slots full, 1 thread.

    git worktree add /tmp/old-engine e4ca776
    python jobs/decode_step.py --arm old=/tmp/old-engine:full --arm old=/tmp/old-engine:elastic:0.2 \\
        --arm new=.:full --arm new=.:elastic:0.2 --arm new=.:full:1.0:compile --arm new=.:elastic:0.2:compile

Each arm is NAME=CODE:METHOD[:BUDGET[:compile]], run in a process of its own that imports
`elastic_ray` from CODE (a checkout), so two versions of the engine can be timed side by side.
Every arm captions the same 16 test scenes with EOS ignored (--tokens each, all in flight at once),
after one untimed round (which compiles the compiled arms); then --rounds rounds, each running every
arm once, in an order that reverses from round to round. A decode step is one `engine.step()` that
decodes (the host's work on its tokens included), timed alone in the process's CPU time and in wall
time. Prints, per arm, the median over rounds of each round's median step, and the ratio of the first
arm of the same method's step to this arm's, per round and their median; JSON with --out.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker(code: str, method: str, budget: float, compiled: bool, slots: int, tokens: int) -> None:
    """Serve rounds on stdin ('run' -> one JSON line of step times), importing elastic_ray from `code`."""
    import torch

    import elastic_ray
    from elastic_ray import CacheConfig, EngineConfig, SamplingParams
    from elastic_ray.data.shapes import CAPTION_INSTRUCTION, make_scenes
    from elastic_ray.engine.engine import Engine
    from elastic_ray.models.loading import load
    from elastic_ray.models.prompts import encode_requests

    assert Path(elastic_ray.__file__).resolve().is_relative_to(Path(code).resolve()), elastic_ray.__file__
    torch.set_num_threads(1)
    model, processor = load("demo")
    requests = [{"image": s.image, "prompt": CAPTION_INSTRUCTION} for s in make_scenes(slots, seed=0, split="test")]
    prompt = encode_requests(processor, requests)["input_ids"].shape[1]  # the same slot size in every version
    options = dict(kv_cache_memory=2**30, max_num_seqs=slots, max_tokens=tokens, max_prompt_tokens=prompt)
    engine = Engine(model, processor, CacheConfig(method, budget).policy,
                    EngineConfig(**options, **({"compile": True} if compiled else {})))
    sampling = SamplingParams(max_tokens=tokens, ignore_eos=True)

    def one_round() -> dict:
        for request in requests:
            engine.add_request(request, sampling)
        cpu, wall = [], []
        while engine.has_unfinished():
            decodes, full = engine.steps["decode"], len(engine.scheduler.running) == slots
            c, w = time.process_time(), time.perf_counter()
            engine.step()
            c, w = time.process_time() - c, time.perf_counter() - w
            if engine.steps["decode"] > decodes and full:
                cpu.append(c)
                wall.append(w)
        return {"steps": len(cpu), "cpu_ms": 1e3 * statistics.median(cpu), "wall_ms": 1e3 * statistics.median(wall)}

    start = time.perf_counter()
    one_round()  # warm-up (and the compile)
    print(json.dumps({"ready": True, "warmup_s": time.perf_counter() - start, "slots": engine.num_slots}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(json.dumps(one_round()), flush=True)


def parse_arm(text: str) -> dict:
    name, _, spec = text.partition("=")
    code, method, *rest = spec.split(":")
    budget = float(rest[0]) if rest else 1.0
    compiled = len(rest) > 1 and rest[1] == "compile"
    label = f"{name} {method}" + (f" {budget:g}" if budget < 1 else "") + (" compiled" if compiled else "")
    return {"label": label, "name": name, "code": code, "method": method, "budget": budget, "compile": compiled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", action="append", default=[], help="NAME=CODE:METHOD[:BUDGET[:compile]]")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", nargs=4, metavar=("CODE", "METHOD", "BUDGET", "COMPILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        code, method, budget, compiled = args.worker
        return worker(code, method, float(budget), compiled == "1", args.slots, args.tokens)

    if not args.arm:
        parser.error("give at least one --arm")
    arms = [parse_arm(a) for a in args.arm]
    processes = []
    for arm in arms:
        code = str(Path(arm["code"]).resolve())
        env = {**os.environ, "PYTHONPATH": code, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, __file__, "--slots", str(args.slots), "--tokens", str(args.tokens), "--worker", code, arm["method"], str(arm["budget"]), "1" if arm["compile"] else "0"]
        processes.append(subprocess.Popen(command, cwd=code, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          text=True))
    for arm, process in zip(arms, processes):  # started together, they warm up side by side
        arm["ready"] = json.loads(process.stdout.readline())
        print(f"{arm['label']:28s} ready: {arm['ready']}", flush=True)
    rounds = []
    for r in range(args.rounds):
        order = list(range(len(arms))) if r % 2 == 0 else list(range(len(arms)))[::-1]
        result = {}
        for i in order:
            processes[i].stdin.write("run\n")
            processes[i].stdin.flush()
            result[arms[i]["label"]] = json.loads(processes[i].stdout.readline())
        rounds.append(result)
        print(f"round {r}: " + ", ".join(f"{k} {v['cpu_ms']:.2f}/{v['wall_ms']:.2f} ms" for k, v in result.items()),
              flush=True)
    for process in processes:
        process.stdin.close()
        process.wait()

    base = {}  # the first arm of each method is the others' yardstick
    for arm in arms:
        base.setdefault((arm["method"], arm["budget"]), arm["label"])
    summary = {}
    print(f"\ndecode step, {args.slots} slots busy, demo model, 1 thread: median over {args.rounds} rounds "
          "(CPU ms, wall ms); speed-up = yardstick's step / this arm's step, per round")
    for arm in arms:
        label, yardstick = arm["label"], base[arm["method"], arm["budget"]]
        row = {clock: statistics.median(r[label][f"{clock}_ms"] for r in rounds) for clock in ("cpu", "wall")}
        for clock in ("cpu", "wall"):
            row[f"speedup_{clock}"] = [r[yardstick][f"{clock}_ms"] / r[label][f"{clock}_ms"] for r in rounds]
        row["yardstick"], row["warmup_s"] = yardstick, arm["ready"]["warmup_s"]
        summary[label] = row
        print(f"  {label:28s} CPU {row['cpu']:7.2f} ms  wall {row['wall']:7.2f} ms   vs {yardstick}: CPU "
              f"x{statistics.median(row['speedup_cpu']):.2f} (" + " ".join(f"{x:.2f}" for x in row["speedup_cpu"])
              + f"), wall x{statistics.median(row['speedup_wall']):.2f} ("
              + " ".join(f"{x:.2f}" for x in row["speedup_wall"]) + ")")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rounds": rounds, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
