"""jobs/caption.py against a `ray start --head` cluster (token auth on): through `ray job submit`,
and killed part-way then resumed into the same output, rows without an id and someone else's
file in the output included."""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from captioning import ray_env, read_output, readable_ids, save_tiny_model, write_output_file
from processes import Service
from elastic_ray.data.shapes import write_shards

pytestmark = pytest.mark.slow  # a Ray cluster and jobs in subprocesses

REPO = Path(__file__).parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def head_service(tmp_path_factory):
    """A head node from `ray start --head --block` in its own session, with a fresh auth token."""
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env = free_ports(7)
    env = {**os.environ, **ray_env()}
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: Ray's socket paths live under it
    service = Service("ray start --head", [
        RAY, "start", "--head", "--block", "--num-cpus", "3", "--object-store-memory", str(128 * 2**20),
        "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--port", str(gcs),
        "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
        "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env),
        "--temp-dir", temp_dir, "--disable-usage-stats"], tmp_path_factory.mktemp("head") / "ray-start.log", env=env)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        service.wait_for(lambda: subprocess.run([RAY, "job", "list", "--address", address], env=env,
                                                capture_output=True, timeout=60).returncode == 0, 180, "a job API")
        yield {"env": env, "gcs": f"127.0.0.1:{gcs}", "dashboard": address, "service": service}
    finally:
        # On SIGINT --block stops the node's processes one by one, each given a second or two to exit
        # (on a loaded machine, more than 30 s in all): then the rest of its group is killed.
        service.stop(signal.SIGINT, grace=30)
        shutil.rmtree(temp_dir, ignore_errors=True)  # the node's session: logs, sockets, spilled objects


@pytest.fixture
def head(head_service):
    """The module's head node, checked before each test: a test after it died fails at once, with its log."""
    head_service["service"].check()
    return head_service


def test_ray_job_submit_captions_the_demo_shards(head, tmp_path):
    write_shards(tmp_path / "in", 6, rows_per_shard=3)
    out = tmp_path / "out"
    result = head["service"].run(
        [RAY, "job", "submit", "--address", head["dashboard"], "--working-dir", ".", "--",
         "python", "jobs/caption.py", "--input", str(tmp_path / "in"), "--output", str(out), "--max-tokens", "8",
         "--num-actors", "1", "--batch-size", "3"],
        timeout=300, cwd=REPO, env=head["env"],
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "captioned 6 rows (0 errors)" in result.stdout
    table = read_output(str(out))
    assert sorted(table.column("id").to_pylist()) == [f"test-0-{i:06d}" for i in range(6)]
    assert all(table.column("caption").to_pylist()) and set(table.column("model").to_pylist()) == {"demo-v2"}
    metrics = json.loads((tmp_path / "out.metrics.json").read_text())
    assert metrics["rows"] == 6 and metrics["errors"] == 0 and metrics["output_tokens"] > 0


def test_with_a_wrong_token_the_cluster_refuses(head):
    env = {**head["env"], "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    result = subprocess.run([RAY, "job", "list", "--address", head["dashboard"]], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert "Invalid authentication token" in result.stderr


def test_a_killed_run_resumes_with_every_id_exactly_once(head, tmp_path):
    model = save_tiny_model(tmp_path / "model")
    write_shards(tmp_path / "in", 40, rows_per_shard=20)
    expected = []
    for shard in sorted((tmp_path / "in").glob("*.parquet")):  # every third row without an id
        table = pq.read_table(shard)
        ids = table.column("id").to_pylist()
        ids = [None if i % 3 == 0 else v for i, v in enumerate(ids)]
        pq.write_table(table.set_column(table.schema.get_field_index("id"), "id", pa.array(ids, pa.string())), shard)
        expected += [f"{shard.name}#{i}" if v is None else v for i, v in enumerate(ids)]
    out = tmp_path / "out"
    command = [sys.executable, "jobs/caption.py", "--address", head["gcs"], "--input", str(tmp_path / "in"),
               "--output", str(out), "--model", model, "--max-tokens", "48", "--batch-size", "2",
               "--rows-per-file", "2", "--no-progress", "--quality-sample", "0"]
    first = subprocess.Popen(command, cwd=REPO, env=head["env"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while len(list(out.glob("*.parquet"))) < 3 and first.poll() is None and time.time() < deadline:
        head["service"].check()
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=30) == -signal.SIGKILL
    partial = len(readable_ids(str(out)))
    assert 0 < partial < 40

    again = head["service"].run(command, timeout=300, cwd=REPO, env=head["env"])
    assert again.returncode == 2 and "pass --resume" in again.stderr
    write_output_file(out / "someone-elses.parquet", ["theirs", expected[0]])  # complete, with our columns
    theirs = (out / "someone-elses.parquet").read_bytes()
    resumed = head["service"].run(command + ["--resume"], timeout=300, cwd=REPO, env=head["env"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 files in the output were not written by this job" in resumed.stderr
    assert (out / "someone-elses.parquet").read_bytes() == theirs
    (out / "someone-elses.parquet").unlink()
    ids = read_output(str(out)).column("id").to_pylist()
    assert sorted(ids) == sorted(expected)
    metrics_file = tmp_path / "out.metrics.json"
    metrics = json.loads(metrics_file.read_text())
    # the metrics are the whole output's; this run's rows and rate apart; the killed run left no record
    assert metrics["resumed_rows"] >= partial and metrics["this_run"]["rows"] == 40 - metrics["resumed_rows"]
    assert (metrics["rows"], metrics["rows_in"], metrics["rows_out"], metrics["unique_ids"]) == (40, 40, 40, 40)
    assert [r["rows"] for r in metrics["runs"]] == [metrics["this_run"]["rows"]]

    # resuming the finished output: said so, exit 0, nothing touched, no Ray (nothing listens at port 1)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()}
    finished = subprocess.run([*command[:command.index("--address")], "--address", "127.0.0.1:1",
                               *command[command.index("--address") + 2:], "--resume"],
                              cwd=REPO, env=head["env"], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "already holds a caption for every input row; nothing to do" in finished.stdout
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()} == before
