"""Throughput under one KV memory budget: plain `generate()` in static batches versus the engine.

Every arm runs the same requests (a LLaVA-1.5-like prompt: 576 image tokens and about 40
text tokens) with EOS ignored, so every arm generates exactly the same number of tokens.
"""

import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from elastic_ray.config import CacheConfig, EngineConfig, SamplingParams
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
    name: str
    method: str  # "generate" = transformers' own generate() with its default full cache
    budget: float = 1.0


ARMS = [
    Arm("a: generate(), full cache, static batches", "generate"),
    Arm("b: engine, full cache", "full"),
    Arm("c: engine, elastic 0.5", "elastic", 0.5),
    Arm("d: engine, elastic 0.2", "elastic", 0.2),
]


# LLaVA-1.5's prompt geometry (336 px, patch 14: 576 image tokens) at two sizes.
SHAPES = {
    "llava-1.5-7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, vocab_size=32064,
                         vision_hidden=1024, vision_intermediate=4096, vision_layers=24, vision_heads=16),
    "quick": dict(hidden=768, intermediate=2048, layers=8, heads=12, vocab_size=32064,
                  vision_hidden=256, vision_layers=4, vision_heads=4),  # ~110 M parameters, for CPUs
}


def random_llava_15(shape: str, dtype: torch.dtype, device) -> tuple:
    """A random-weight LLaVA of one of `SHAPES`: throughput needs no trained weights."""
    return random_llava(image_size=336, patch_size=14, dtype=dtype, device=device, **SHAPES[shape])


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


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_device_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return None  # no allocator statistics on the CPU


def prompt_tokens(processor, requests: list[dict]) -> int:
    """The longest prompt among the requests, in tokens."""
    return max(int(encode_requests(processor, [r])["attention_mask"].sum()) for r in requests)


def full_sequence_bytes(model, processor, max_tokens: int) -> int:
    """KV bytes of the workload's longest request with a full cache."""
    image_size = processor.image_processor.crop_size["height"]
    prompt = prompt_tokens(processor, workload(len(INSTRUCTIONS), image_size))
    return (prompt + max_tokens) * family_of(model).entry_bytes(next(model.parameters()).element_size())


def run_generate(model, processor, requests, max_tokens: int, kv_budget_bytes: int) -> dict:
    """Arm (a): `model.generate()` in static batches of the largest size whose full cache fits."""
    entry_bytes = family_of(model).entry_bytes(next(model.parameters()).element_size())
    per_seq = (prompt_tokens(processor, requests) + max_tokens) * entry_bytes
    batch = kv_budget_bytes // per_seq
    if batch < 1:
        raise ValueError(f"the KV budget of {kv_budget_bytes} bytes holds no full-cache sequence of {per_seq} bytes")
    param = next(model.parameters())
    peak, generated = 0, 0
    start = time.perf_counter()
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
    wall = time.perf_counter() - start
    return {"wall_s": wall, "generated_tokens": generated, "slots": batch, "kv_bytes_per_seq": per_seq,
            "peak_kv_bytes": peak}


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


def run_engine(model, processor, cache: CacheConfig, requests, max_tokens: int, kv_budget_bytes: int) -> dict:
    """Arms (b)-(d): every request queued at once; the engine keeps its slots full. Decode steps at
    full occupancy are timed to compare the bytes they read with the device's copy bandwidth."""
    config = EngineConfig(kv_cache_memory=kv_budget_bytes, max_num_seqs=len(requests),
                          max_prompt_tokens=prompt_tokens(processor, requests), max_tokens=max_tokens)
    engine = Engine(model, processor, cache.policy, config)
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    full_steps, generated = [], 0
    start = time.perf_counter()
    for request in requests:
        engine.add_request(request, sampling)
    while engine.has_unfinished():
        busy, prefills = len(engine.scheduler.running), engine.steps["prefill"]
        stored = sum(s.kv_entries for s in engine.scheduler.running) * engine.entry_bytes
        step_start = time.perf_counter()
        outputs = engine.step()
        if engine.steps["prefill"] == prefills and busy == engine.num_slots:
            full_steps.append((time.perf_counter() - step_start, stored))
        generated += sum(len(o.token_ids) for o in outputs if o.finished)
    wall = time.perf_counter() - start
    weights = decode_weight_bytes(model)
    rates = sorted((weights + stored) / seconds for seconds, stored in full_steps)
    return {"wall_s": wall, "generated_tokens": generated, "slots": engine.num_slots,
            "kv_bytes_per_seq": engine.slot_size * engine.entry_bytes, "peak_kv_bytes": engine.peak_kv_bytes,
            "kv_allocated_bytes": engine.kv_allocated_bytes, "full_decode_steps": len(full_steps),
            "decode_read_bytes_per_s": rates[len(rates) // 2] if rates else None}


def run_benchmark(model, processor, *, num_requests: int, max_tokens: int, kv_budget_bytes: int,
                  arms: list[Arm] = ARMS, warmup: int = 2) -> dict:
    """Every arm on the same requests and budget, one after the other in this process."""
    device = next(model.parameters()).device
    image_size = processor.image_processor.crop_size["height"]
    requests = workload(num_requests, image_size)
    results = []
    for arm in arms:
        warm = workload(warmup, image_size, seed=1)
        if arm.method == "generate":
            run_generate(model, processor, warm, 2, kv_budget_bytes)
        else:
            run_engine(model, processor, CacheConfig(arm.method, arm.budget), warm, 2, kv_budget_bytes)
        _reset_peak(device)
        if arm.method == "generate":
            measured = run_generate(model, processor, requests, max_tokens, kv_budget_bytes)
        else:
            measured = run_engine(model, processor, CacheConfig(arm.method, arm.budget), requests, max_tokens,
                                  kv_budget_bytes)
        measured["peak_device_bytes"] = _peak_device_bytes(device)
        results.append({
            "name": arm.name, "method": arm.method, "budget": arm.budget,
            "tokens_per_s": measured["generated_tokens"] / measured["wall_s"],
            "requests_per_s": num_requests / measured["wall_s"],
            **measured,
        })
    base = results[0]["tokens_per_s"]
    bandwidth = copy_bandwidth(device)
    for result in results:
        result["speedup"] = result["tokens_per_s"] / base
        rate = result.get("decode_read_bytes_per_s")
        result["decode_bandwidth_fraction"] = None if rate is None else rate / bandwidth
    prompt = prompt_tokens(processor, requests)
    return {
        "device": device_name(device),
        "kv_budget_bytes": kv_budget_bytes,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "decode_weight_bytes": decode_weight_bytes(model),
        "workload": {"requests": num_requests, "max_tokens": max_tokens, "prompt_tokens": prompt,
                     "image_tokens": getattr(model.config, "image_seq_length", None),
                     "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")},
        "arms": results,
    }


def format_table(result: dict) -> str:
    """The arms as a Markdown table."""
    header = ("| arm | requests/s | tokens/s | slots | KV bytes/seq | peak KV bytes | speed-up vs (a) "
              "| decode step, share of copy bandwidth |")
    rows = [header, "|" + "---|" * 8]
    for arm in result["arms"]:
        share = arm["decode_bandwidth_fraction"]
        rows.append(
            f"| {arm['name']} | {arm['requests_per_s']:.2f} | {arm['tokens_per_s']:.1f} | {arm['slots']} | "
            f"{arm['kv_bytes_per_seq']:,} | {arm['peak_kv_bytes']:,} | {arm['speedup']:.2f}x | "
            f"{'n/a' if share is None else f'{share:.0%}'} |"
        )
    return "\n".join(rows)
