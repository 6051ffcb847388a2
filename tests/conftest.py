"""Shared fixtures: tiny random VLMs built offline, and a batch of prompts that needs left padding."""

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
