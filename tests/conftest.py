"""Shared fixtures: tiny random VLMs built offline, and a batch of prompts that needs left padding."""

import contextlib
import http.server
import threading

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
