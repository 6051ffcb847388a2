"""Training loop for the bundled demo VLM: captions and VQA on freshly generated shapes scenes.

Every step draws new train-split scenes, so the model never sees a test scene. Each example
is either the caption (instruction ``Describe the image.``) or one of the scene's questions;
the loss covers only the answer tokens and the closing ``</s>``.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LlavaForConditionalGeneration, LlavaProcessor

from elastic_ray.data.shapes import CAPTION_INSTRUCTION, Scene, iter_scenes
from elastic_ray.models.demo_build import (
    DEMO_DIR,
    IMAGE_TOKEN,
    MAX_NEW_TOKENS,
    build_config,
    build_processor,
    build_tokenizer,
    format_prompt,
)

IGNORE = -100


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.01
    caption_fraction: float = 0.5
    seed: int = 0
    threads: int = 2
    log_every: int = 25


class BatchMaker:
    """Turns scenes into right-padded training tensors with answer-only labels."""

    def __init__(self, processor: LlavaProcessor, num_image_tokens: int):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.num_image_tokens = num_image_tokens
        self._prompt_ids: dict[str, list[int]] = {}

    def prompt_ids(self, instruction: str) -> list[int]:
        """Token ids of the prompt with ``<image>`` expanded, as the processor would produce them."""
        if instruction not in self._prompt_ids:
            text = format_prompt(instruction).replace(IMAGE_TOKEN, IMAGE_TOKEN * self.num_image_tokens)
            self._prompt_ids[instruction] = self.tokenizer(text).input_ids
        return self._prompt_ids[instruction]

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(" " + answer, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]

    def __call__(self, examples: list[tuple[Scene, str, str]]) -> dict[str, torch.Tensor]:
        rows = [(self.prompt_ids(q), self.answer_ids(a)) for _, q, a in examples]
        width = max(len(p) + len(a) for p, a in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE)
        for i, (p, a) in enumerate(rows):
            n = len(p) + len(a)
            input_ids[i, :n] = torch.tensor(p + a)
            attention_mask[i, :n] = 1
            labels[i, len(p):n] = torch.tensor(a)
        pixels = self.processor.image_processor([s.image for s, _, _ in examples], return_tensors="pt")
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "pixel_values": pixels.pixel_values, "labels": labels}


def examples(seed: int, caption_fraction: float):
    """Endless (scene, instruction, answer) triples from the train split."""
    rng = random.Random(seed)
    for scene in iter_scenes(seed, "train"):
        if rng.random() < caption_fraction:
            yield scene, CAPTION_INSTRUCTION, scene.caption
        else:
            yield (scene, *rng.choice(scene.qa))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio`."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Next-token cross-entropy and accuracy over labelled positions."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != IGNORE
    picked = logits[keep]
    target = labels[keep]
    loss = F.cross_entropy(picked.float(), target)
    accuracy = (picked.argmax(-1) == target).float().mean().item()
    return loss, accuracy


def train_demo(out_dir: str | Path = DEMO_DIR, cfg: TrainConfig = TrainConfig(),
               log: Callable[[str], None] = print) -> dict:
    """Build, train and save the demo model; returns the final metrics."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    config = build_config(tokenizer)
    model = LlavaForConditionalGeneration(config)
    log(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")

    make_batch = BatchMaker(processor, config.image_seq_length)
    stream = examples(cfg.seed, cfg.caption_fraction)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))

    model.train()
    start = time.time()
    window: list[tuple[float, float]] = []
    for step in range(cfg.steps):
        batch = make_batch([next(stream) for _ in range(cfg.batch_size)])
        labels = batch.pop("labels")
        loss, accuracy = answer_loss(model(**batch).logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        window.append((loss.item(), accuracy))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            mean_loss = sum(w[0] for w in window) / len(window)
            mean_acc = sum(w[1] for w in window) / len(window)
            elapsed = time.time() - start
            log(f"step {step + 1}/{cfg.steps} loss {mean_loss:.4f} token_acc {mean_acc:.4f} "
                f"lr {scheduler.get_last_lr()[0]:.2e} {elapsed / (step + 1):.2f} s/step {elapsed:.0f} s")
            window.clear()

    metrics = {"loss": mean_loss, "token_accuracy": mean_acc, "wall_s": round(time.time() - start, 1)}
    save_demo(model, processor, out_dir, {"train_config": asdict(cfg), "final": metrics})
    return metrics


def save_demo(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out_dir: str | Path,
              record: dict) -> None:
    """Write an HF-format directory: weights, config, processor, generation config, training record."""
    out = Path(out_dir)
    tokenizer = processor.tokenizer
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
