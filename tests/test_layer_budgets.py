"""Per-layer budgets: layers keep different counts (spec §10 per layer with its own ratio b_l),
the mean of the b_l is the budget, and the engine still equals generate() request by request."""

import json
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from conftest import encode
from elastic_ray import CacheConfig, EngineConfig, SamplingParams
from elastic_ray.engine.engine import Engine
from elastic_ray.eval.layer_calibration import calibration_record, retention_curves
from elastic_ray.eval.samples import shapes_samples
from elastic_ray.hf.generate import generate_compressed
from elastic_ray.hf.static import StaticBatchGenerator
from elastic_ray.kv import make_policy
from elastic_ray.kv.layers import load_calibration, solve_split
from test_engine import MAX_TOKENS, requests, run_streaming

REPO = Path(__file__).parents[1]
SPLIT = (0.3, 0.7)  # the tiny models have 2 layers; mean 0.5
METHODS = [
    ("elastic", {}),
    ("elastic-vl", {}),
    ("h2o", {}),
    ("h2o", {"recent_ratio": 0.0}),
    ("streaming", {}),
]


def reference_counts(prompt_len: int, steps: int, ratio: float, reserved: int) -> tuple[list[int], int]:
    """Spec §10 for one layer with its own ratio, written out: C0, then the fixed-point rule per step.
    Returns the count after the prompt and after each step, and the peak (the entry appended before
    an eviction counted: the slot size)."""
    removed = int(prompt_len * (1 - ratio) + 1e-6)
    count = prompt_len if prompt_len <= reserved else max(reserved, prompt_len - removed)
    counts, peak = [count], count
    for step in range(1, steps + 1):
        count += 1
        peak = max(peak, count)
        if ratio < 1 and count >= ratio * (prompt_len + step) + 1 - 1e-6:
            count -= 1
        counts.append(count)
    return counts, peak


@pytest.mark.parametrize("method,options", METHODS)
def test_engine_equals_generate_per_layer_and_layers_keep_different_counts(method, options, tiny_llava, images):
    cache = CacheConfig(method, 0.5, layer_budgets=list(SPLIT), **options)
    engine = Engine(*tiny_llava, cache.policy, EngineConfig(max_num_seqs=3, kv_cache_memory=1 << 26))
    outputs, busy, _ = run_streaming(engine, requests(images), MAX_TOKENS)
    assert max(busy) == 3
    reference = StaticBatchGenerator(*tiny_llava, cache.policy)
    batched = reference.generate(requests(images), SamplingParams(max_tokens=max(MAX_TOKENS), ignore_eos=True))
    for request, n, got, padded in zip(requests(images), MAX_TOKENS, outputs, batched):
        alone = reference.generate([request], SamplingParams(max_tokens=n, ignore_eos=True))[0]
        assert got.token_ids == alone.token_ids == padded.token_ids[:n]
        assert got.stats["kv_entries"] == alone.stats["kv_entries"]
        assert got.stats["kv_entries_prompt"] == alone.stats["kv_entries_prompt"]
        first, second = got.stats["kv_entries_prompt"]
        assert first < second  # the split is in force: layer 0 keeps 0.3, layer 1 0.7


@pytest.mark.parametrize("method,options", METHODS)
def test_each_layer_keeps_the_counts_of_spec_10_at_its_own_ratio(method, options, tiny_llava, images):
    policy = make_policy(method, 0.5, layer_budgets=list(SPLIT), **options)
    inputs = encode(tiny_llava, images)
    steps = 30
    _, cache = generate_compressed(tiny_llava[0], inputs, policy, max_new_tokens=steps + 1, do_sample=False,
                                   min_new_tokens=steps + 1)
    for row, prompt_len in enumerate(inputs["attention_mask"].sum(1).tolist()):
        for layer, ratio in enumerate(SPLIT):
            want, peak = reference_counts(prompt_len, steps, ratio, policy.reserved)
            assert [int(h[layer, row]) for h in cache.history[: steps + 1]] == want
            assert policy.for_layer(layer).peak_entries(prompt_len, steps) == peak
    engine = Engine(*tiny_llava, policy, EngineConfig(max_num_seqs=2, max_prompt_tokens=60, max_tokens=steps))
    outputs, _, _ = run_streaming(engine, requests(images, 3), [steps] * 3)
    sizes = engine.slot_sizes
    assert sizes == [policy.for_layer(layer).peak_entries(60, steps) for layer in range(2)] and sizes[0] < sizes[1]
    for out in outputs:
        want = [reference_counts(out.stats["prompt_tokens"], steps - 1, ratio, policy.reserved)[0][-1]
                for ratio in SPLIT]
        assert out.stats["kv_entries"] == want
        assert out.stats["kv_bytes"] == sum(want) * engine.entry_bytes // 2


def test_memory_accounting_uses_each_layers_size(tiny_llava):
    memory = 3_000_000
    config = EngineConfig(kv_cache_memory=memory, max_num_seqs=1000, max_prompt_tokens=120, max_tokens=40)
    split = Engine(*tiny_llava, CacheConfig("elastic", 0.5, layer_budgets=[0.2, 0.8]).policy, config)
    layer_bytes = split.entry_bytes // 2
    sizes = [make_policy("elastic", b).peak_entries(120, 40) for b in (0.2, 0.8)]
    assert split.slot_sizes == sizes and split.slot_bytes == sum(sizes) * layer_bytes
    assert split.num_slots == memory // split.slot_bytes
    assert split.kv_allocated_bytes == split.num_slots * split.slot_bytes <= memory
    assert [k.shape[2] for k in split.runner.slots.keys] == sizes
    uniform = Engine(*tiny_llava, CacheConfig("elastic", 0.5).policy, config)
    assert abs(split.slot_bytes - uniform.slot_bytes) <= 2 * layer_bytes  # the same total, up to rounding


def test_a_uniform_split_is_no_split_at_all(tmp_path):
    plain = make_policy("elastic-vl", 0.5)
    assert make_policy("elastic-vl", 0.5, layer_budgets=[0.5, 0.5, 0.5]) == plain
    assert make_policy("elastic-vl", 0.5, layer_budgets="0.5 0.5") == plain
    assert plain.layer_budgets is None and plain.for_layer(2) is plain
    same = calibration(tmp_path / "same.json", [[0.2, 0.5, 0.8, 1.0]] * 3)  # layers alike: the uniform split
    assert make_policy("elastic-vl", 0.5, layer_budgets=str(same)) == plain


def calibration(path, curves, method="elastic-vl", grid=(0.25, 0.5, 0.75, 1.0), **changes):
    record = {"version": 1, "method": method, "layers": len(curves), "ratios": list(grid), "retention": curves}
    path.write_text(json.dumps(record | changes))
    return path


def test_a_calibration_gives_every_layer_the_same_retention_at_mean_ratio_budget(tmp_path):
    concentrated, spread = [0.3, 0.8, 1.0, 1.0], [0.2, 0.4, 0.7, 1.0]
    path = calibration(tmp_path / "c.json", [concentrated, spread, spread])
    for budget in (0.3, 0.5, 0.7):
        split = make_policy("elastic-vl", budget, layer_budgets=str(path)).layer_budgets
        assert sum(split) / 3 == pytest.approx(budget, abs=1e-9)
        assert split[0] < budget < split[1] == split[2] <= 1.0
        # the retention each layer reaches at its ratio, read off its curve: the same level
        levels = [numpy.interp(ratio, (0.25, 0.5, 0.75, 1.0), curve)
                  for ratio, curve in zip(split, (concentrated, spread))]
        if split[0] > 0.25:
            assert levels[0] == pytest.approx(levels[1], abs=1e-6)
        else:  # clamped at the grid's first ratio: it keeps at least the level there
            assert budget == 0.3 and levels[0] >= levels[1] - 1e-6
    assert make_policy("elastic-vl", 0.2, layer_budgets=str(path)).layer_budgets is None  # below the grid: uniform


@pytest.mark.parametrize("value,message", [
    ([0.3, 0.3], "mean 0.3, not the budget 0.5"),
    ([0.0, 1.0], "in (0, 1]"),
    ([0.5, 1.5], "in (0, 1]"),
    (["x", 0.5], "in (0, 1]"),
    ([], "a list of 1 to"),
    (3, "a list of 1 to"),
])
def test_bad_ratios_are_refused_with_the_reason(value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_policy("h2o", 0.5, layer_budgets=value)


def test_bad_calibration_files_are_refused_with_the_reason(tmp_path, tiny_llava, images):
    good = [[0.3, 0.6, 0.9, 1.0]] * 2
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    cases = {
        bad_json: "not valid JSON",
        tmp_path / "missing.json": "cannot read calibration file",
        calibration(tmp_path / "range.json", [[0.3, 0.6, 1.5, 1.0]] * 2): "numbers in \\[0, 1\\]",
        calibration(tmp_path / "grid.json", good, grid=(0.5, 0.25, 0.75, 1.0)): "ascending",
        calibration(tmp_path / "count.json", good, layers=3): "layers is 3 but retention has 2",
        calibration(tmp_path / "method.json", good, method="h2o"): "calibrated for 'h2o', not 'elastic-vl'",
        calibration(tmp_path / "version.json", good, version=7): "version-1 calibration record",
    }
    for path, message in cases.items():
        with pytest.raises(ValueError, match=message):
            make_policy("elastic-vl", 0.5, layer_budgets=str(path))
    three = make_policy("elastic-vl", 0.5, layer_budgets=str(calibration(tmp_path / "3.json", [good[0], good[0],
                                                                                              [0.1, 0.2, 0.5, 1.0]])))
    with pytest.raises(ValueError, match="layer_budgets has 3 ratios but the model has 2 layers"):
        Engine(*tiny_llava, three, EngineConfig(max_num_seqs=1))
    with pytest.raises(ValueError, match="layer_budgets has 3 ratios but the model has 2 layers"):
        generate_compressed(tiny_llava[0], encode(tiny_llava, images), three, max_new_tokens=2)


@pytest.mark.parametrize("criterion", ["mass", "output"])
@pytest.mark.parametrize("method", ["elastic-vl", "h2o"])
def test_calibration_measures_each_layers_retention_and_its_file_round_trips(method, criterion, tiny_llava, tmp_path):
    model, processor = tiny_llava
    policy = make_policy(method, 0.5)
    samples = shapes_samples(2, seed=0, split="train")
    curves = retention_curves(model, processor, policy, samples, grid=(0.1, 0.3, 0.6, 1.0), criterion=criterion)
    assert len(curves) == 2
    for curve in curves:  # a share, growing with the ratio, all of it when nothing is dropped
        assert 0 <= curve[0] < curve[2] < 1.0 and curve[-1] == pytest.approx(1.0, abs=1e-5)
    record = calibration_record("tiny", policy, {}, samples, curves, grid=(0.1, 0.3, 0.6, 1.0), criterion=criterion)
    assert record["criterion"].startswith(criterion)
    path = tmp_path / f"tiny-{method}.json"
    path.write_text(json.dumps(record))
    assert load_calibration(str(path), method) == record
    split = make_policy(method, 0.5, layer_budgets=str(path)).layer_budgets
    assert split == solve_split(record, 0.5) and sum(split) / 2 == pytest.approx(0.5)
    with pytest.raises(ValueError, match="scores no prompt entries"):
        retention_curves(model, processor, make_policy("streaming", 0.5), samples)
    with pytest.raises(ValueError, match="criterion must be one of"):
        retention_curves(model, processor, policy, samples, criterion="loss")


@pytest.mark.slow
def test_the_calibration_job_writes_a_file_the_policy_loads_and_refuses_what_it_cannot_calibrate(tmp_path):
    out = tmp_path / "demo-h2o.json"
    job = [sys.executable, "jobs/calibrate_layers.py", "--model", "demo", "--samples", "1", "--out", str(out)]
    result = subprocess.run([*job, "--method", "h2o"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    record = load_calibration(str(out), "h2o")
    assert record["layers"] == 3 and record["samples"] == 2 and record["data"] == "demo shapes (train split)"
    split = make_policy("h2o", 0.3, layer_budgets=str(out)).layer_budgets
    assert f"budget 0.3: {' '.join(f'{b:.3f}' for b in split)}" in result.stdout
    for args, message in [(["--method", "streaming"], "streaming cannot be calibrated"),
                          (["--samples", "0"], "--samples must be at least 1"),
                          (["--cache-option", "recent_ratio=2", "--method", "h2o"], "recent_ratio must be in [0, 1)")]:
        refused = subprocess.run([*job, *args], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
