"""Training loop for the bundled demo VLM: captions and VQA on freshly generated shapes scenes.

Every step draws new train-split scenes, so the model never sees a test scene. Each image is
trained on its caption (instruction ``Describe the image.``) and a few of its questions, packed
as independent single-turn segments; the language-model loss covers only the answer tokens and
the closing ``</s>``. A training-only
patch-labelling loss (demo_patch_loss) speeds up grounding; its head is not saved.
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

from elastic_ray.data.shapes import CAPTION_INSTRUCTION, Scene, iter_scenes, question_kind
from elastic_ray.models.demo_build import (
    DEMO_DIR,
    IMAGE_TOKEN,
    MAX_NEW_TOKENS,
    PROMPT_TEMPLATE,
    build_config,
    build_processor,
    build_tokenizer,
    format_prompt,
)
from elastic_ray.models.demo_patch_loss import PatchHead, attribute_word_ids, patch_targets

IGNORE = -100


@dataclass
class TrainConfig:
    steps: int = 2800
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.01
    questions_per_image: int = 4
    patch_loss_weight: float = 1.0
    seed: int = 0
    threads: int = 2
    log_every: int = 25


class BatchMaker:
    """Packs one image and several (instruction, answer) segments into each row.

    The segments share the image prefix ``<s>USER: <image>...\\n``; a 4-D mask lets each one see
    only the prefix and itself, and its positions restart after the prefix. Each segment thus
    trains exactly like its own single-turn example, without re-encoding the image.
    """

    def __init__(self, processor: LlavaProcessor, num_image_tokens: int):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.num_image_tokens = num_image_tokens
        self.prefix = self._ids(PROMPT_TEMPLATE.split("{prompt}")[0])
        self._prompts: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        """Token ids with ``<image>`` expanded, as the processor produces them."""
        return self.tokenizer(text.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.num_image_tokens)).input_ids

    def prompt_ids(self, instruction: str) -> list[int]:
        """The prompt's tokens after the shared prefix."""
        if instruction not in self._prompts:
            ids = self._ids(format_prompt(instruction))
            assert ids[: len(self.prefix)] == self.prefix, "prompt does not start with the shared prefix"
            self._prompts[instruction] = ids[len(self.prefix):]
        return self._prompts[instruction]

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(" " + answer, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]

    def __call__(self, rows: list[tuple[Scene, list[tuple[str, str]]]]) -> dict[str, torch.Tensor]:
        n = len(self.prefix)
        packed = []
        for _, segments in rows:
            ids, seg, pos, lab = list(self.prefix), [0] * n, list(range(n)), [IGNORE] * n
            for k, (instruction, answer) in enumerate(segments, start=1):
                prompt, target = self.prompt_ids(instruction), self.answer_ids(answer)
                ids += prompt + target
                seg += [k] * (len(prompt) + len(target))
                pos += range(n, n + len(prompt) + len(target))
                lab += [IGNORE] * len(prompt) + target
            packed.append((ids, seg, pos, lab))

        width = max(len(p[0]) for p in packed)
        pad = (self.tokenizer.pad_token_id, -1, 0, IGNORE)
        input_ids, segment, position_ids, labels = (
            torch.tensor([p[i] + [pad[i]] * (width - len(p[i])) for p in packed]) for i in range(4)
        )
        key, query = segment[:, None, :], segment[:, :, None]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        mask = causal & ((key == 0) | (key == query)) & (key >= 0)
        mask |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves only
        scenes = [scene for scene, _ in rows]
        pixels = self.processor.image_processor([s.image for s in scenes], return_tensors="pt")
        return {
            "input_ids": input_ids,
            "attention_mask": mask[:, None],
            "position_ids": position_ids,
            "pixel_values": pixels.pixel_values,
            "labels": labels,
            "patch_targets": torch.stack([patch_targets(s, self.processor.patch_size) for s in scenes]),
        }


# Finding an object by what it is ("Where is the red circle?") is learnt far more slowly than
# reading what is at a place, so those questions are drawn this many times more often.
LOOKUP_WEIGHT = {"color_of": 3.0, "where": 3.0}


def examples(seed: int, questions_per_image: int):
    """Endless (scene, segments) pairs from the train split: the caption and a few questions."""
    rng = random.Random(seed)
    for scene in iter_scenes(seed, "train"):
        # weighted sampling without replacement: the largest u ** (1 / weight) win
        keys = [rng.random() ** (1 / LOOKUP_WEIGHT.get(question_kind(q), 1.0)) for q, _ in scene.qa]
        chosen = sorted(range(len(keys)), key=keys.__getitem__, reverse=True)[:questions_per_image]
        yield scene, [(CAPTION_INSTRUCTION, scene.caption), *(scene.qa[i] for i in chosen)]


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


def train_demo(out_dir: str | Path = DEMO_DIR, cfg: TrainConfig | None = None,
               log: Callable[[str], None] = print) -> dict:
    """Build, train and save the demo model; returns the final metrics."""
    cfg = cfg or TrainConfig()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    config = build_config(tokenizer)
    model = LlavaForConditionalGeneration(config)
    log(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")

    head = PatchHead(config.text_config.hidden_size, attribute_word_ids(tokenizer))
    image_features: list[torch.Tensor] = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, out: image_features.append(out))

    make_batch = BatchMaker(processor, config.image_seq_length)
    stream = examples(cfg.seed, cfg.questions_per_image)
    params = [*model.parameters(), *head.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))

    model.train()
    start = time.time()
    window: list[tuple[float, float, float]] = []
    for step in range(cfg.steps):
        batch = make_batch([next(stream) for _ in range(cfg.batch_size)])
        labels, targets = batch.pop("labels"), batch.pop("patch_targets")
        image_features.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(**batch).logits
        loss, accuracy = answer_loss(logits, labels)
        patch_loss = head(image_features[0], targets, model.get_input_embeddings().weight)
        optimizer.zero_grad(set_to_none=True)
        (loss + cfg.patch_loss_weight * patch_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        window.append((loss.item(), accuracy, patch_loss.item()))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            mean_loss, mean_acc, mean_patch = (sum(w[i] for w in window) / len(window) for i in range(3))
            elapsed = time.time() - start
            log(f"step {step + 1}/{cfg.steps} loss {mean_loss:.4f} token_acc {mean_acc:.4f} "
                f"patch_loss {mean_patch:.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                f"{elapsed / (step + 1):.2f} s/step {elapsed:.0f} s")
            window.clear()
    hook.remove()

    metrics = {"loss": mean_loss, "token_accuracy": mean_acc, "patch_loss": mean_patch,
               "wall_s": round(time.time() - start, 1)}
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
