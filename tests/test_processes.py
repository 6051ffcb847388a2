"""The suite's own processes (tests/processes.py): a test that leans on a service that dies fails at
once with the service's log, and stopping a service leaves nothing of it running."""

import sys
import time

import pytest

from processes import Service, _running

# Starts, says so, and exits with a reason a second later, as a cluster that falls over would.
DYING = "import sys, time; print('up', flush=True); time.sleep(1); sys.exit('the raylet died')"


def test_a_command_that_needs_a_dead_service_fails_at_once_with_the_services_log(tmp_path):
    service = Service("the test service", [sys.executable, "-c", DYING], tmp_path / "service.log")
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"exited with status 1(.|\n)*the raylet died"):
        service.run([sys.executable, "-c", "import time; time.sleep(300)"], timeout=300)
    assert time.monotonic() - start < 60  # not the command's 300 s
    service.stop()


def test_waiting_for_a_service_that_dies_fails_at_once(tmp_path):
    service = Service("the test service", [sys.executable, "-c", DYING], tmp_path / "service.log")
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="the test service exited"):
        service.wait_for(lambda: False, 300, "its address")
    assert time.monotonic() - start < 60
    service.stop()


def test_stop_kills_what_the_service_started_even_when_it_ignores_the_signal(tmp_path):
    log = tmp_path / "service.log"
    # a shell that ignores SIGTERM and has started a child of its own
    service = Service("the test service", ["bash", "-c", "trap '' TERM; sleep 300 & echo $!; wait"], log)
    child = int(service.wait_for(lambda: log.read_text().strip(), 60, "its child's pid"))
    assert _running(child)
    assert service.stop(grace=1) is None  # it had to be killed
    time.sleep(0.5)
    assert not _running(child) and service.proc.poll() is not None
