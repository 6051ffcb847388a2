"""jobs/benchmark.py: every arm generates the same tokens under the same KV budget, and says so."""

import json
import subprocess
import sys

import pytest

from elastic_ray.benchmark import ARMS, format_table, full_sequence_bytes, run_benchmark


@pytest.mark.slow
def test_every_arm_runs_the_same_work_within_the_same_budget(tiny_llava):
    model, processor = tiny_llava
    budget = 3 * full_sequence_bytes(model, processor, max_tokens=6)
    result = run_benchmark(model, processor, num_requests=10, max_tokens=6, kv_budget_bytes=budget, warmup=1)
    assert result["kv_budget_bytes"] == budget and result["device"].startswith("cpu")
    arms = result["arms"]
    assert [a["name"] for a in arms] == [a.name for a in ARMS]
    assert {a["generated_tokens"] for a in arms} == {10 * 6}
    generate, full, half, fifth = arms
    assert generate["slots"] == 3 and generate["speedup"] == 1.0
    assert full["slots"] <= 3 < half["slots"] < fifth["slots"]
    for arm in arms:
        assert 0 < arm["peak_kv_bytes"] <= budget
        assert arm["slots"] * arm["kv_bytes_per_seq"] <= budget
        assert arm["tokens_per_s"] > 0 and abs(arm["requests_per_s"] * 6 - arm["tokens_per_s"]) < 1e-6 * arm["tokens_per_s"]
    assert fifth["kv_bytes_per_seq"] < half["kv_bytes_per_seq"] < full["kv_bytes_per_seq"]
    assert json.loads(json.dumps(result)) == result
    assert format_table(result).count("\n") == 1 + len(arms)
    assert generate["decode_bandwidth_fraction"] is None
    for arm in (full, half, fifth):
        assert arm["full_decode_steps"] > 0 and 0 < arm["decode_bandwidth_fraction"]


def test_the_job_has_the_documented_flags():
    out = subprocess.run([sys.executable, "jobs/benchmark.py", "--help"], capture_output=True, text=True, check=True)
    for flag in ("--model", "--requests", "--max-tokens", "--full-sequences", "--kv-budget-bytes", "--device", "--out", "--quick"):
        assert flag in out.stdout
