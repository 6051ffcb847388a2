"""Processes the tests start, and what they leave behind.

Fixtures run their clusters and servers (a Ray cluster, a Serve job, an S3 server) as a `Service`:
a test fails at once, with the reason and the end of the process's log, when one has died or dies
while the test waits on it, instead of waiting out a timeout; each is stopped with everything it
started (its whole process group), even when a test fails. conftest.py takes the suite's
housekeeping from here: every Ray the tests start keeps its files in one folder removed at the end,
and no process a test body starts is left running after it.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _running(pid: int) -> bool:
    """Whether `pid` runs (a zombie has exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


class Service:
    """A long-running process in its own session (so its process group is everything it starts),
    its stdout and stderr in `log`; `pids` are further processes it must keep running (a cluster's
    raylets)."""

    def __init__(self, name: str, args: list[str], log: Path, **popen):
        self.name, self.log, self.pids = name, log, []
        with open(log, "w") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen)

    def trouble(self) -> str | None:
        """Why the service is down, or None while it runs."""
        if self.proc.poll() is not None:
            return f"exited with status {self.proc.returncode}"
        lost = [pid for pid in self.pids if not _running(pid)]
        return f"lost its processes {lost}" if lost else None

    def fail(self, reason: str) -> None:
        pytest.fail(f"{self.name} {reason}; the end of its log {self.log}:\n{tail(self.log)}", pytrace=False)

    def check(self) -> None:
        """Fail the test at once if the service is down."""
        reason = self.trouble()
        if reason:
            self.fail(reason)

    def wait_for(self, ready: Callable[[], object], timeout: float, what: str):
        """Poll `ready()` until it returns something true (returned), failing at once if the service goes
        down and after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            value = ready()
            if value:
                return value
            if time.monotonic() > deadline:
                self.fail(f"did not get {what} within {timeout:.0f} s")
            time.sleep(0.5)

    def run(self, args: list[str], timeout: float, **popen) -> subprocess.CompletedProcess:
        """Run a command that needs the service to completion (text output captured); it is killed and
        the test fails at once if the service goes down, or after `timeout` seconds."""
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
        return self.communicate(proc, timeout)

    def communicate(self, proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
        """`proc.communicate()` while watching the service: see `run`."""
        deadline = time.monotonic() + timeout
        reason = None
        while reason is None:
            try:
                out, err = proc.communicate(timeout=1)  # retrying after a timeout loses no output
                return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            except subprocess.TimeoutExpired:
                reason = self.trouble() or (f"outlived by {args_text(proc)} ({timeout:.0f} s)"
                                            if time.monotonic() > deadline else None)
        proc.kill()
        out, err = proc.communicate()
        self.fail(f"{reason}\n--- {args_text(proc)}, the end of its output:\n{out[-2000:]}{err[-3000:]}")

    def stop(self, sig: int | None = signal.SIGTERM, grace: float = 30.0) -> int | None:
        """Send `sig` (None: the caller has already asked it to stop), wait up to `grace` seconds, then
        SIGKILL whatever is left of its process group; returns its exit status, None if it had to be killed."""
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            code = None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # workers and helpers it started, even after a clean exit
        except ProcessLookupError:
            pass
        self.proc.wait()
        return code


def args_text(proc: subprocess.Popen) -> str:
    return " ".join(map(str, proc.args))[:200]


@pytest.fixture(scope="session", autouse=True)
def ray_temp_dir():
    """Every Ray the tests start (in this process, or in the jobs and clusters they run) keeps its
    session files (logs, sockets, spilled objects) in one short folder of its own, removed at the end."""
    path = tempfile.mkdtemp(prefix="er-", dir="/tmp")  # short: Ray's socket paths live under it
    before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = path
    yield path
    if before is None:
        del os.environ["RAY_TMPDIR"]
    else:
        os.environ["RAY_TMPDIR"] = before
    shutil.rmtree(path, ignore_errors=True)


def _children(pid: int) -> dict[int, int]:
    """The running children of `pid`, with their process group ids (from /proc)."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):  # it has just exited
            continue
        state, parent, group = fields[0], int(fields[1]), int(fields[2])
        if parent == pid and state != "Z":
            children[int(entry)] = group
    return children


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        found += (new := list(_children(todo.pop())))
        todo += new
    return found


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Processes the test body started and left running (a failed assertion before a job ended) are
    killed with everything they started; fixtures' processes (started at setup) are theirs to stop."""
    before = set(_children(os.getpid()))
    try:
        return (yield)
    finally:
        left = {pid: group for pid, group in _children(os.getpid()).items() if pid not in before}
        for pid, group in left.items():
            for victim in [*_descendants(pid), pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGKILL)
            if group == pid:  # it leads its own group: whatever else is in it
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
        if left:
            warnings.warn(f"{item.nodeid} left processes running, killed: {sorted(left)}")
