"""jobs/benchmark.py: every arm generates the same tokens under the same KV budget, interleaved over
rounds, and says where a decode step's time goes."""

import json
import subprocess
import sys

import pytest

from elastic_ray.benchmark import ARMS, format_table, full_sequence_bytes, run_benchmark


@pytest.mark.slow
def test_every_arm_runs_the_same_work_within_each_budget_of_the_sweep(tiny_llava):
    model, processor = tiny_llava
    per_sequence = full_sequence_bytes(model, processor, max_tokens=6)
    budgets = [2 * per_sequence, 3 * per_sequence]
    lines = []
    result = run_benchmark(model, processor, num_requests=10, max_tokens=6, kv_budgets=budgets, rounds=2, warmup=1,
                           arms=[a for a in ARMS if a.key in "abcd"], log=lines.append)
    assert result["kv_budgets"] == budgets and result["device"].startswith("cpu") and result["rounds"] == 2
    arms = result["arms"]
    assert len(lines) == 2 * len(arms) == 2 * 4 * len(budgets)  # every (arm, budget) once per round
    assert [(a["key"], a["kv_budget_bytes"]) for a in arms] == [(k, b) for b in budgets for k in "abcd"]
    assert {a["generated_tokens"] for a in arms} == {10 * 6}
    for budget, sequences in zip(budgets, (2, 3)):
        generate, full, half, fifth = (a for a in arms if a["kv_budget_bytes"] == budget)
        assert generate["slots"] == sequences and generate["speedup"] == generate["speedup_cpu"] == 1.0
        assert full["slots"] <= sequences < half["slots"] < fifth["slots"] and full["vs_engine_full_cpu"] == 1.0
        assert fifth["kv_bytes_per_seq"] < half["kv_bytes_per_seq"] < full["kv_bytes_per_seq"]
        for arm in (generate, full, half, fifth):
            assert 0 < arm["peak_kv_bytes"] <= budget and arm["slots"] * arm["kv_bytes_per_seq"] <= budget
            assert arm["tokens_per_s"] > 0 and arm["tokens_per_cpu_s"] > 0 and arm["cpu_s"] > 0
        for arm in (full, half, fifth):
            assert arm["decode_tokens"] + 10 == 10 * 6  # each request's first token comes from its prefill
            assert 0 < arm["step_attention_s"] < arm["step_model_s"] and arm["step_host_s"] > 0
            assert arm["full_decode_steps"] > 0 and 0 < arm["decode_bandwidth_fraction"]
            assert 0 < arm["mean_busy_slots"] <= arm["slots"]
        assert generate["decode_bandwidth_fraction"] is None
    assert half["slots"] > [a for a in arms if a["key"] == "c"][0]["slots"]  # a larger budget, more slots
    assert json.loads(json.dumps(result)) == result
    assert format_table(result).count("\n") == 1 + len(arms)


def test_the_job_has_the_documented_flags():
    out = subprocess.run([sys.executable, "jobs/benchmark.py", "--help"], capture_output=True, text=True, check=True)
    for flag in ("--model", "--shape", "--requests", "--max-tokens", "--full-sequences", "--kv-budget-bytes",
                 "--max-num-seqs", "--arms", "--rounds", "--device", "--out", "--quick"):
        assert flag in out.stdout
