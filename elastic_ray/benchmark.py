"""Throughput at equal KV memory: transformers' `generate()` in static batches against the engine
(full cache and Elastic Cache, eager and compiled), over a sweep of KV memory budgets.

Every arm runs the same requests (a LLaVA-1.5-like prompt: the model's image tokens and about 40
text tokens) with EOS ignored, so every arm generates exactly the same tokens. Arms are
interleaved: each round runs every (arm, budget) once, in an order that reverses from round to
round, and each figure is the median over rounds, in wall time and in process CPU time beside
it, so a machine whose load changes cannot favour one arm. Ratios are taken within a round.
"""

import gc
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from elastic_ray.config import CacheConfig, EngineConfig, SamplingParams
from elastic_ray.engine import attention
from elastic_ray.engine.engine import Engine
from elastic_ray.models.family import family_of
from elastic_ray.models.prompts import encode_requests
from elastic_ray.models.synthetic import WORDS, random_llava

# About 40 tokens once the template is added; three variants so prompts differ in length a little.
INSTRUCTIONS = [
    " ".join(WORDS[i : i + n] * 2)
    for i, n in ((0, 17), (5, 18), (9, 16))
]


@dataclass(frozen=True)
class Arm:
    key: str
    name: str
    method: str  # "generate" = transformers' own generate() with its default full cache
    budget: float = 1.0
    compile: bool = False
    async_output: bool | None = None  # None: the device's default (on for CUDA)


ARMS = [
    Arm("a", "generate(), full cache, static batches", "generate"),
    Arm("b", "engine, full cache", "full"),
    Arm("c", "engine, elastic 0.5", "elastic", 0.5),
    Arm("d", "engine, elastic 0.2", "elastic", 0.2),
    Arm("e", "engine, full cache, compiled", "full", compile=True),
    Arm("f", "engine, elastic 0.2, compiled", "elastic", 0.2, compile=True),
    Arm("g", "engine, elastic 0.2, async output", "elastic", 0.2, async_output=True),
    Arm("h", "engine, elastic 0.2, sync output", "elastic", 0.2, async_output=False),
]

# Random-weight LLaVA-1.5 shapes (336 px, patch 14: 576 image tokens unless said otherwise).
SHAPES = {
    # the real model's geometry, for a GPU
    "llava-1.5-7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, vocab_size=32064,
                         vision_hidden=1024, vision_intermediate=4096, vision_layers=24, vision_heads=16),
    # ~110 M parameters for CPUs; a decode step reads ~4x more weight bytes than one slot of KV, so on
    # a CPU its step is bound by the weight matmuls, which grow with the batch: compute-bound
    "quick": dict(hidden=768, intermediate=2048, layers=8, heads=12, vocab_size=32064,
                  vision_hidden=256, vision_layers=4, vision_heads=4),
    # bandwidth-bound on a CPU: 1024 image tokens and a small MLP, so one slot of KV (9 MB in float32)
    # outweighs a decode step's whole weight read (8.4 MB, head included), so with a few slots a
    # step's time goes to reading the cache
    "bandwidth": dict(image_size=448, hidden=256, intermediate=256, layers=4, heads=4, vocab_size=1024,
                      vision_hidden=64, vision_layers=1, vision_heads=2),
}


def random_llava_15(shape: str, dtype: torch.dtype, device) -> tuple:
    """A random-weight LLaVA of one of `SHAPES`: throughput needs no trained weights."""
    options = {"image_size": 336, **SHAPES[shape]}
    return random_llava(patch_size=14, dtype=dtype, device=device, **options)


def workload(n: int, image_size: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"image": Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)),
         "prompt": INSTRUCTIONS[i % len(INSTRUCTIONS)]}
        for i in range(n)
    ]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompt_tokens(processor, requests: list[dict]) -> int:
    """The longest prompt among the requests, in tokens."""
    return max(int(encode_requests(processor, [r])["attention_mask"].sum()) for r in requests)


def full_sequence_bytes(model, processor, max_tokens: int) -> int:
    """KV bytes of the workload's longest request with a full cache."""
    image_size = processor.image_processor.crop_size["height"]
    prompt = prompt_tokens(processor, workload(len(INSTRUCTIONS), image_size))
    return (prompt + max_tokens) * family_of(model).entry_bytes(next(model.parameters()).element_size())


def copy_bandwidth(device: torch.device, nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes per second a large on-device copy moves (read plus write), best of `repeats`."""
    source = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def decode_weight_bytes(model) -> int:
    """Weight bytes one decode step reads: the language model and its head (the input embedding
    table only where it is the head's weight too; a lookup reads just the fed rows)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    params = {id(p): p for p in model.model.language_model.parameters() if p is not embedding}
    params[id(head)] = head
    return sum(p.numel() * p.element_size() for p in params.values())


class Clock:
    """Elapsed time of the device's work: process CPU time on a CPU; on CUDA, wall time after a
    synchronisation (so only use it where the engine synchronises anyway, or in a benchmark)."""

    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return time.process_time()


@contextmanager
def step_split(engine: Engine, clock: Clock, totals: dict):
    """Adds to `totals` the time decode steps spend in the model forward ("model") and, for an eager
    engine, inside its attention backend ("attention": KV writes, masks, attention and eviction;
    part of "model"). Compiled steps run as one graph: their attention is not separable."""
    runner, forward, decode_attention = engine.runner, engine.runner.forward, attention.decode_attention

    def timed(function, key):
        def call(*args, **kwargs):
            start = clock.now()
            try:
                return function(*args, **kwargs)
            finally:
                totals[key] += clock.now() - start
        return call

    runner.forward = timed(forward, "model")
    if not engine.compiled:
        attention.decode_attention = timed(decode_attention, "attention")
    try:
        yield
    finally:
        runner.forward, attention.decode_attention = forward, decode_attention


def run_generate(model, processor, requests, max_tokens: int, kv_budget_bytes: int) -> dict:
    """Arm (a): `model.generate()` in static batches of the largest size whose full cache fits."""
    entry_bytes = family_of(model).entry_bytes(next(model.parameters()).element_size())
    per_seq = (prompt_tokens(processor, requests) + max_tokens) * entry_bytes
    batch = kv_budget_bytes // per_seq
    if batch < 1:
        raise ValueError(f"the KV budget of {kv_budget_bytes} bytes holds no full-cache sequence of {per_seq} bytes")
    param = next(model.parameters())
    peak, generated = 0, 0
    for first in range(0, len(requests), batch):
        inputs = {
            k: v.to(param.device, dtype=param.dtype if v.is_floating_point() else None)
            for k, v in encode_requests(processor, requests[first : first + batch]).items()
        }
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=processor.tokenizer.pad_token_id,
                                 return_dict_in_generate=True)
        cache = out.cache if "cache" in out else out.past_key_values  # renamed in transformers 5.24
        peak = max(peak, sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers))
        generated += (out.sequences.shape[1] - inputs["input_ids"].shape[1]) * out.sequences.shape[0]
    return {"generated_tokens": generated, "slots": batch, "kv_bytes_per_seq": per_seq, "peak_kv_bytes": peak}


def make_engine(model, processor, arm: Arm, requests, max_tokens: int, kv_budget_bytes: int,
                max_num_seqs: int | None) -> Engine:
    config = EngineConfig(kv_cache_memory=kv_budget_bytes, max_num_seqs=max_num_seqs or len(requests),
                          max_prompt_tokens=prompt_tokens(processor, requests), max_tokens=max_tokens,
                          compile=arm.compile, async_output=arm.async_output)
    return Engine(model, processor, CacheConfig(arm.method, arm.budget).policy, config)


def run_engine(engine: Engine, requests, max_tokens: int, clock: Clock) -> dict:
    """Arms (b)-(f): every request queued at once; the engine keeps its slots full. Decode steps are
    timed one by one (their tokens per second is the decode phase's), split into model, attention and
    host; those at full occupancy also give the bytes a step reads against the copy bandwidth."""
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    split = {"model": 0.0, "attention": 0.0}
    decode = {"steps": 0, "tokens": 0, "s": 0.0}
    full_steps, generated = [], 0
    prefills, peak = engine.steps["prefill"], engine.peak_kv_bytes
    engine.peak_kv_bytes = 0
    with step_split(engine, clock, split):
        for request in requests:
            engine.add_request(request, sampling)
        while engine.has_unfinished():
            busy, before = len(engine.scheduler.running), engine.steps["decode"]
            stored = engine.kv_bytes(sum(sum(s.kv_entries) for s in engine.scheduler.running))
            start = clock.now()
            outputs = engine.step()
            seconds = clock.now() - start
            if engine.steps["decode"] > before:
                decode["steps"] += 1
                decode["tokens"] += busy
                decode["s"] += seconds
                if busy == engine.num_slots:
                    full_steps.append((seconds, stored))
            generated += sum(len(o.token_ids) for o in outputs if o.finished)
    weights = decode_weight_bytes(engine.model)
    rates = sorted((weights + stored) / seconds for seconds, stored in full_steps)
    steps = max(decode["steps"], 1)
    result = {
        "generated_tokens": generated, "slots": engine.num_slots,
        "kv_bytes_per_seq": engine.slot_bytes, "peak_kv_bytes": engine.peak_kv_bytes,
        "kv_allocated_bytes": engine.kv_allocated_bytes, "prefill_steps": engine.steps["prefill"] - prefills,
        "decode_steps": decode["steps"], "decode_tokens": decode["tokens"], "decode_s": decode["s"],
        "mean_busy_slots": decode["tokens"] / steps, "full_decode_steps": len(full_steps),
        "decode_read_bytes_per_s": rates[len(rates) // 2] if rates else None,
        "step_model_s": split["model"] / steps,
        "step_attention_s": None if engine.compiled else split["attention"] / steps,
        "step_host_s": (decode["s"] - split["model"]) / steps,
    }
    engine.peak_kv_bytes = max(peak, engine.peak_kv_bytes)
    return result


def run_benchmark(model, processor, *, num_requests: int, max_tokens: int, kv_budgets: list[int],
                  arms: list[Arm] = ARMS, rounds: int = 3, max_num_seqs: int | None = None, warmup: int = 2,
                  keep_engines: bool = True, log=lambda line: None) -> dict:
    """Every arm at every KV budget on the same requests, interleaved over `rounds`.

    An engine is made once per (arm, budget) and warmed up (compiled arms compile there, timed as
    `warmup_s`); with `keep_engines` False (a GPU, where two engines' KV would not fit) each run
    makes its own and drops it after.
    """
    device = next(model.parameters()).device
    clock = Clock(device)
    image_size = processor.image_processor.crop_size["height"]
    requests, warm = workload(num_requests, image_size), workload(warmup, image_size, seed=1)
    cells = [(arm, budget) for budget in kv_budgets for arm in arms]
    engines, warmup_s, runs = {}, {}, {cell: [] for cell in cells}

    def engine_for(cell):
        if cell in engines:
            return engines[cell]
        arm, budget = cell
        engine = make_engine(model, processor, arm, requests, max_tokens, budget, max_num_seqs)
        start = time.perf_counter()
        run_engine(engine, warm, 2, clock)  # compiles, for a compiled arm
        warmup_s[cell] = time.perf_counter() - start
        if keep_engines:
            engines[cell] = engine
        return engine

    for cell in cells:
        if cell[0].method == "generate":
            run_generate(model, processor, warm, 2, cell[1])
        elif keep_engines:
            engine_for(cell)
    for round_ in range(rounds):
        for cell in cells if round_ % 2 == 0 else cells[::-1]:
            arm, budget = cell
            engine = None if arm.method == "generate" else engine_for(cell)
            _synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            if engine is None:
                measured = run_generate(model, processor, requests, max_tokens, budget)
            else:
                measured = run_engine(engine, requests, max_tokens, clock)
            _synchronize(device)
            measured |= {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
            runs[cell].append(measured)
            del engine
            if not keep_engines:  # free its KV memory, held by its compiled step's caches too
                torch._dynamo.reset()
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            log(f"round {round_} {arm.name} @ {budget:,} B: {measured['generated_tokens']} tokens, "
                f"{measured['wall_s']:.2f} s wall, {measured['cpu_s']:.2f} s CPU")
    bandwidth = copy_bandwidth(device)
    results = [_summary(arm, budget, runs, warmup_s.get((arm, budget)), num_requests, bandwidth)
               for arm, budget in cells]
    return {
        "device": device_name(device),
        "kv_budgets": kv_budgets,
        "rounds": rounds,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "decode_weight_bytes": decode_weight_bytes(model),
        "workload": {"requests": num_requests, "max_tokens": max_tokens,
                     "prompt_tokens": prompt_tokens(processor, requests),
                     "image_tokens": getattr(model.config, "image_seq_length", None),
                     "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")},
        "arms": results,
    }


def _summary(arm: Arm, budget: int, runs: dict, warmup_s: float | None, num_requests: int, bandwidth: float) -> dict:
    """An (arm, budget)'s medians over rounds, and its per-round ratios to the same budget's
    generate() and eager full-cache engine."""
    mine = runs[arm, budget]

    def median(key, rows=mine):
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(values) if values else None

    def ratio(base_key: str, key: str) -> float | None:
        base = next((rows for (other, b), rows in runs.items() if b == budget and other.key == base_key), None)
        if base is None:
            return None
        return statistics.median((r["generated_tokens"] / r[key]) / (b["generated_tokens"] / b[key])
                                 for r, b in zip(mine, base))

    result = {
        "key": arm.key, "name": arm.name, "method": arm.method, "budget": arm.budget, "compile": arm.compile,
        "async_output": arm.async_output,
        "kv_budget_bytes": budget, **{k: mine[0][k] for k in ("generated_tokens", "slots", "kv_bytes_per_seq")},
        "wall_s": median("wall_s"), "cpu_s": median("cpu_s"), "peak_kv_bytes": max(r["peak_kv_bytes"] for r in mine),
        "warmup_s": warmup_s,
        "speedup": ratio("a", "wall_s"), "speedup_cpu": ratio("a", "cpu_s"),
        "vs_engine_full_cpu": ratio("b", "cpu_s"),
    }
    result["tokens_per_s"] = result["generated_tokens"] / result["wall_s"]
    result["tokens_per_cpu_s"] = result["generated_tokens"] / result["cpu_s"]
    result["requests_per_s"] = num_requests / result["wall_s"]
    if arm.method != "generate":
        result |= {k: median(k) for k in ("decode_s", "step_model_s", "step_attention_s", "step_host_s",
                                          "decode_read_bytes_per_s", "mean_busy_slots")}
        result |= {k: mine[0][k] for k in ("decode_steps", "decode_tokens", "full_decode_steps", "kv_allocated_bytes")}
        result["decode_tokens_per_s"] = result["decode_tokens"] / result["decode_s"]
        rate = result["decode_read_bytes_per_s"]
        result["decode_bandwidth_fraction"] = None if rate is None else rate / bandwidth
    else:
        result["decode_bandwidth_fraction"] = None
    return result


def format_table(result: dict) -> str:
    """The arms as a Markdown table, budget by budget."""
    header = ["arm", "KV budget", "slots", "tokens/s", "tokens/CPU-s", "vs (a), CPU", "vs (b), CPU",
              "decode tokens/s", "decode step ms: model / attention / host", "share of copy bandwidth", "warm-up s"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def show(value, form: str, suffix: str = "") -> str:
        return "-" if value is None else format(value, form) + suffix

    for arm in result["arms"]:
        split = " / ".join(show(arm.get(k) and 1e3 * arm[k], ".2f")
                           for k in ("step_model_s", "step_attention_s", "step_host_s"))
        cells = [f"{arm['key']}: {arm['name']}", f"{arm['kv_budget_bytes'] / 2**20:,.1f} MiB", str(arm["slots"]),
                 show(arm["tokens_per_s"], ".1f"), show(arm["tokens_per_cpu_s"], ".1f"),
                 show(arm["speedup_cpu"], ".2f", "x"), show(arm["vs_engine_full_cpu"], ".2f", "x"),
                 show(arm.get("decode_tokens_per_s"), ".1f"), split if arm["method"] != "generate" else "-",
                 show(arm["decode_bandwidth_fraction"], ".0%"), show(arm["warmup_s"], ".1f")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
