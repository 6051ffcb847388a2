"""Processes that fixtures start and tests lean on (a Ray cluster, a Serve job, an S3 server).

A test fails at once, with the reason and the end of the process's log, when one has died or dies
while the test waits on it, instead of waiting out a timeout; each is stopped with everything it
started (its whole process group), even when a test fails.
"""

import os
import signal
import subprocess
import time
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
        while True:
            try:
                out, err = proc.communicate(timeout=1)  # retrying after a timeout loses no output
                return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            except subprocess.TimeoutExpired:
                reason = self.trouble() or (f"outlived by {args_text(proc)} ({timeout:.0f} s)"
                                            if time.monotonic() > deadline else None)
                if reason:
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
