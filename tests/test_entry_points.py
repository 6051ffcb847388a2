"""The entry points parse their arguments before importing torch or Ray: `--help` (and a bad
argument) answers at once."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
HEAVY = ("torch", "ray", "transformers", "matplotlib")

# `--help` run as `python jobs/X.py --help` would run it; then the heavy modules it had imported.
HELP_THEN_MODULES = f"""
import json, runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code
print(json.dumps({{"code": code, "imported": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


@pytest.mark.parametrize("job", ["report", "evaluate", "benchmark", "load_test", "train_demo", "eval_demo", "caption",
                                 "engine_baseline", "caption_benchmark", "object_store_cost", "calibrate_layers"])
def test_help_imports_neither_torch_nor_ray(job):
    result = subprocess.run([sys.executable, "-c", HELP_THEN_MODULES, f"jobs/{job}.py"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    usage, _, last = result.stdout.rstrip().rpartition("\n")
    assert usage.startswith("usage: ") and f"{job}.py" in usage
    assert json.loads(last) == {"code": 0, "imported": []}
