"""Full-cache quality of a demo VLM on unseen (test-split) scenes, with real and with blank images.

Plain greedy ``generate`` over left-padded batches, prompts from the model's own chat template.
Captions are scored by exact match and object F1, descriptions (v2) by ROUGE-L against the
reference, and every question of every scene by exact answer, per question kind. Blank images
(one flat colour) must make every score collapse: that shows the answers come from the image.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from elastic_ray.data.shapes import BACKGROUND, CAPTION_INSTRUCTION, Scene, answer_match, caption_exact_match, object_f1
from elastic_ray.data.shapes_v2 import DESCRIPTION_INSTRUCTION, question_kind
from elastic_ray.demo.build import DemoSpec
from elastic_ray.eval.metrics import rouge_l
from elastic_ray.models.prompts import build_prompt

ANSWER_TOKENS = 4  # the longest short answer ("bottom right", "checkered") is two words
CAPTION_TOKENS = 48  # a four-object caption is about 40 tokens


def load_demo(model_dir: str | Path, attn_implementation: str = "sdpa"):
    """A demo model (eval mode) and its processor, from a local directory."""
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, attn_implementation=attn_implementation).eval()
    return model, AutoProcessor.from_pretrained(model_dir)


@torch.inference_mode()
def generate_answers(model, processor, images: list[Image.Image], instructions: list[str],
                     max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy answers, one per (image, instruction) pair."""
    answers = []
    for i in range(0, len(images), batch_size):
        prompts = [build_prompt(processor, q) for q in instructions[i:i + batch_size]]
        inputs = processor(images=images[i:i + batch_size], text=prompts, padding=True, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        answers += [a.strip() for a in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def score(model, processor, scenes: list[Scene], images: list[Image.Image], batch_size: int = 32) -> dict:
    """Caption exact match and object F1, description ROUGE-L (scenes that have one), and VQA
    accuracy over every question of every scene, overall and per kind."""
    captions = generate_answers(model, processor, images, [CAPTION_INSTRUCTION] * len(scenes), CAPTION_TOKENS, batch_size)
    refs = [s.caption for s in scenes]
    result = {
        "caption_exact_match": sum(map(caption_exact_match, captions, refs)) / len(scenes),
        "object_f1": sum(map(object_f1, captions, refs)) / len(scenes),
    }
    described = [i for i, s in enumerate(scenes) if any(q == DESCRIPTION_INSTRUCTION for q, _ in s.long_targets)]
    if described:
        descriptions = generate_answers(model, processor, [images[i] for i in described],
                                        [DESCRIPTION_INSTRUCTION] * len(described),
                                        model.generation_config.max_new_tokens, batch_size)
        references = [scenes[i].description for i in described]
        result["description_rouge_l"] = rouge_l(descriptions, references)
        result["description_exact_match"] = sum(map(caption_exact_match, descriptions, references)) / len(described)
    pairs = [(image, q, a) for scene, image in zip(scenes, images) for q, a in scene.qa]
    answers = generate_answers(model, processor, [p[0] for p in pairs], [p[1] for p in pairs], ANSWER_TOKENS, batch_size)
    hits: dict[str, list[bool]] = defaultdict(list)
    for answer, (_, question, ref) in zip(answers, pairs):
        hits[question_kind(question)].append(answer_match(answer, ref))
    return {
        **result,
        "vqa_accuracy": sum(sum(h) for h in hits.values()) / len(pairs),
        "vqa_by_kind": {kind: sum(h) / len(h) for kind, h in sorted(hits.items())},
        "n_questions": len(pairs),
    }


def evaluate_demo(spec: DemoSpec, model_dir: str | Path, n: int = 500, seed: int = 0,
                  batch_size: int = 32, blank: bool = True) -> dict:
    """Scores on `n` test scenes of the model's data; with `blank`, the same with every image blanked."""
    start = time.time()
    model, processor = load_demo(model_dir)
    scenes = spec.scenes(n, seed=seed, split="test")
    result = {"model": spec.name, "dir": str(model_dir), "n_scenes": n, "seed": seed,
              **score(model, processor, scenes, [s.image for s in scenes], batch_size)}
    if blank:
        blanks = [Image.new("RGB", s.image.size, (BACKGROUND,) * 3) for s in scenes]
        result["blank"] = score(model, processor, scenes, blanks, batch_size)
    result["wall_s"] = round(time.time() - start, 1)
    return result
