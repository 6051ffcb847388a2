"""Shared fixtures: tiny random VLMs built offline, and a batch of prompts that needs left padding;
and the suite's housekeeping: one temporary folder for every Ray the tests start, removed at the
end, and no process a test body starts left running after it."""

import contextlib
import http.server
import os
import shutil
import signal
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from elastic_ray.models.synthetic import random_llava, random_qwen2_vl

INSTRUCTIONS = [
    "describe the image .",
    "what",
    "what color is the red circle at the top left ? describe the shape and the color of the image",
]


@pytest.fixture(scope="session")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in INSTRUCTIONS]


@pytest.fixture(scope="session")
def tiny_llava():
    return random_llava(attn_implementation="sdpa")


@pytest.fixture(scope="session")
def tiny_llava_eager():
    return random_llava(attn_implementation="eager")


@pytest.fixture(scope="session")
def tiny_qwen():
    return random_qwen2_vl(attn_implementation="sdpa")


@pytest.fixture(scope="session")
def tiny_qwen25():
    return random_qwen2_vl(version="2.5", attn_implementation="sdpa")


@pytest.fixture(scope="session", params=["llava", "qwen2_vl", "qwen2_5_vl"])
def tiny_vlm(request):
    return request.getfixturevalue({"llava": "tiny_llava", "qwen2_vl": "tiny_qwen", "qwen2_5_vl": "tiny_qwen25"}[request.param])


def encode(model_and_processor, images, instructions=INSTRUCTIONS):
    """Left-padded processor inputs for the given instructions, one image each."""
    from elastic_ray.models.prompts import build_prompt

    _, processor = model_and_processor
    prompts = [build_prompt(processor, text) for text in instructions]
    return processor(images=list(images[: len(prompts)]), text=prompts, return_tensors="pt", padding=True)


@contextlib.contextmanager
def http_image_server(image: bytes, paths: set[str], redirects: dict[str, str]):
    """On 127.0.0.1: `image` at `paths`, a 302 to `redirects[path]` at those, 404 elsewhere; yields
    the base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path in redirects:
                self.send_response(302)
                self.send_header("Location", redirects[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200 if self.path in paths else 404)
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


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
