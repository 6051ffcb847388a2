"""Quality of the demo VLM on test-split shapes scenes, with real and with blank images.

Plain greedy ``generate`` over left-padded batches. Blank images (the background colour only)
must make every score collapse: that shows the answers come from the image.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from elastic_ray.data.shapes import (
    BACKGROUND,
    CAPTION_INSTRUCTION,
    Scene,
    answer_match,
    caption_exact_match,
    make_scenes,
    object_f1,
    question_kind,
)
from elastic_ray.models.demo_build import DEMO_DIR, MAX_NEW_TOKENS, format_prompt

ANSWER_TOKENS = 4  # the longest short answer ("bottom right") is two words


def load_demo(model_dir: str | Path = DEMO_DIR):
    """The demo model (eval mode) and its processor, from a local directory."""
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    return model, AutoProcessor.from_pretrained(model_dir)


@torch.inference_mode()
def generate_answers(model, processor, images: list[Image.Image], instructions: list[str],
                     max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy answers, one per (image, instruction) pair."""
    answers = []
    for i in range(0, len(images), batch_size):
        prompts = [format_prompt(q) for q in instructions[i:i + batch_size]]
        inputs = processor(images=images[i:i + batch_size], text=prompts, padding=True, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        answers += [a.strip() for a in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def score(model, processor, scenes: list[Scene], images: list[Image.Image], batch_size: int = 32) -> dict:
    """Caption exact match, mean object F1 and VQA accuracy (every question of every scene)."""
    captions = generate_answers(model, processor, images, [CAPTION_INSTRUCTION] * len(scenes),
                                MAX_NEW_TOKENS, batch_size)
    pairs = [(image, q, a) for scene, image in zip(scenes, images) for q, a in scene.qa]
    answers = generate_answers(model, processor, [p[0] for p in pairs], [p[1] for p in pairs],
                               ANSWER_TOKENS, batch_size)
    refs = [s.caption for s in scenes]
    hits: dict[str, list[bool]] = defaultdict(list)
    for answer, (_, question, ref) in zip(answers, pairs):
        hits[question_kind(question)].append(answer_match(answer, ref))
    return {
        "caption_exact_match": sum(map(caption_exact_match, captions, refs)) / len(scenes),
        "object_f1": sum(map(object_f1, captions, refs)) / len(scenes),
        "vqa_accuracy": sum(sum(h) for h in hits.values()) / len(pairs),
        "vqa_by_kind": {kind: sum(h) / len(h) for kind, h in sorted(hits.items())},
        "n_questions": len(pairs),
    }


def evaluate_demo(model_dir: str | Path = DEMO_DIR, n: int = 500, seed: int = 0,
                  batch_size: int = 32, blank: bool = True) -> dict:
    """Scores on `n` test scenes; with `blank`, the same scores with every image blanked."""
    start = time.time()
    model, processor = load_demo(model_dir)
    scenes = make_scenes(n, seed=seed, split="test")
    result = {"n_scenes": n, "seed": seed,
              **score(model, processor, scenes, [s.image for s in scenes], batch_size)}
    if blank:
        blanks = [Image.new("RGB", s.image.size, (BACKGROUND,) * 3) for s in scenes]
        result["blank"] = score(model, processor, scenes, blanks, batch_size)
    result["wall_s"] = round(time.time() - start, 1)
    return result
