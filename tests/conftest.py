"""Shared fixtures: tiny random VLMs built offline, a batch of prompts that needs left padding, an
image server, and files a reader of untrusted paths must refuse."""

import contextlib
import http.server
import os
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from elastic_ray.models.synthetic import random_llava, random_qwen2_vl
from processes import pytest_runtest_call, ray_temp_dir  # noqa: F401  (the suite's housekeeping: a hook, a fixture)

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


# Qwen2.5-VL shares Qwen2-VL's text path (GQA, M-RoPE): its runs of the cross-model tests are slow-only.
@pytest.fixture(scope="session", params=["llava", "qwen2_vl", pytest.param("qwen2_5_vl", marks=pytest.mark.slow)])
def tiny_vlm(request):
    return request.getfixturevalue({"llava": "tiny_llava", "qwen2_vl": "tiny_qwen", "qwen2_5_vl": "tiny_qwen25"}[request.param])


def encode(model_and_processor, images, instructions=INSTRUCTIONS):
    """Left-padded processor inputs for the given instructions, one image each."""
    from elastic_ray.models.prompts import build_prompt

    _, processor = model_and_processor
    prompts = [build_prompt(processor, text) for text in instructions]
    return processor(images=list(images[: len(prompts)]), text=prompts, return_tensors="pt", padding=True)


@contextlib.contextmanager
def http_image_server(image: bytes, paths: set[str], redirects: dict[str, str] | None = None,
                      log: list[tuple[str, str]] | None = None, delay_s: float = 0.0):
    """On 127.0.0.1: `image` at `paths` (whatever the query), a 302 to `redirects[path]` at those,
    404 elsewhere, each answer after `delay_s`; every request's (method, raw path) is appended to
    `log`. Yields the base URL."""
    redirects = redirects or {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if log is not None:
                log.append((self.command, self.path))
            time.sleep(delay_s)
            if self.path in redirects:
                self.send_response(302)
                self.send_header("Location", redirects[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200 if self.path.split("?", 1)[0] in paths else 404)
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(image)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# A file of each kind a reader of untrusted local paths must refuse, and why.
SPECIAL_FILES = {
    "fifo.png": "is a FIFO, not a regular file",
    "socket.png": "is a socket, not a regular file",
    "folder.png": "is a directory, not a regular file",
    "to-outside.png": "outside the allowed locations",
    "to-zero.png": "outside the allowed locations",
    "to-fifo.png": "is a FIFO, not a regular file",
    "loop.png": "is a symlink, not a regular file",
}


@contextlib.contextmanager
def special_files(folder, outside):
    """SPECIAL_FILES made in `folder` (`outside`: a readable file elsewhere for a link to point
    at); on exit, a reader still blocked opening the FIFO is let go."""
    os.mkfifo(folder / "fifo.png")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "socket.png"))
    (folder / "folder.png").mkdir()
    (folder / "to-outside.png").symlink_to(outside)
    (folder / "to-zero.png").symlink_to("/dev/zero")
    (folder / "to-fifo.png").symlink_to(folder / "fifo.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    try:
        yield SPECIAL_FILES
    finally:
        server.close()
        try:
            os.close(os.open(folder / "fifo.png", os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # nobody is blocked on it
            pass


def within(seconds: float, fn, *args, **kwargs):
    """`fn(*args, **kwargs)` on a thread; fails if it has not returned after `seconds`, so a read
    that blocks fails the test instead of hanging it."""
    box = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} still blocked after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]
