"""Training the demo VLMs: seeded, resumable, logged; the result is a plain HF LLaVA directory.

A run checkpoints its whole state (weights, optimiser, schedule, the example stream's random
state, torch's RNG, the log) every `checkpoint_every_s` seconds; the same call on the same
checkpoint folder continues from the last checkpoint and ends with the same weights as a run
never stopped. A training-only patch-labelling loss (patch_loss) speeds up grounding; it can
be switched off for the last part of training, and its head is never saved.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import transformers
from transformers import GenerationConfig, LlavaForConditionalGeneration, LlavaProcessor

from elastic_ray.demo.batches import IGNORE, Batch, BatchMaker, ExampleStream
from elastic_ray.demo.build import DEMO_V1, DEMO_V2, DemoSpec, build_config, build_processor, build_tokenizer
from elastic_ray.demo.curve import plot_history
from elastic_ray.demo.patch_loss import PatchHead, attribute_word_ids

# Finding an object by what it is ("Where is the red circle?") is learnt far more slowly than
# reading what is at a place, so those questions are drawn this many times more often.
LOOKUP_WEIGHT = {"color_of": 3.0, "where": 3.0}
RUN_SETTINGS = ("threads", "log_every", "checkpoint_every_s")  # may change between a run and its resumption


@dataclass
class TrainConfig:
    steps: int = 2800
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.01
    questions_per_image: int = 4
    row_tokens: int = 0  # > 0: a row takes as many questions as fit in this many tokens instead
    question_weights: dict[str, float] = field(default_factory=lambda: dict(LOOKUP_WEIGHT))
    system_dropout: float = 0.0  # share of rows whose prompt leaves out the system prompt
    patch_loss_weight: float = 1.0
    patch_loss_end: float = 1.0  # share of the steps after which the patch loss is off
    patch_loss_fade: float = 0.0  # share of the steps over which its weight falls to 0 before that
    seed: int = 0
    threads: int = 2
    log_every: int = 25
    checkpoint_every_s: float = 300.0

    def patch_weight(self, step: int) -> float:
        """The patch loss's weight at `step`: full, then a linear fade to 0 at `patch_loss_end`."""
        end, fade = self.patch_loss_end * self.steps, self.patch_loss_fade * self.steps
        if step >= end:
            return 0.0
        return self.patch_loss_weight * min(1.0, (end - step) / fade) if fade else self.patch_loss_weight

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to `min_lr_ratio`."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# demo-v2 (about 3.6 CPU-hours at 1 thread: 5.4 s a step): the patch loss grounds the tower for
# the first half and is gone for the last 40 %; rows are filled with questions up to 448 tokens.
# Weight decay 0.1, and rows without the system prompt (a quarter, as if from LLaVA's language-
# model pretraining) so that BOS is the one token every sequence starts with: the conditions
# under which language models develop an attention sink on it.
CONFIGS: dict[str, tuple[DemoSpec, TrainConfig]] = {
    "demo": (DEMO_V1, TrainConfig()),
    "demo-v2": (DEMO_V2, TrainConfig(
        steps=2400, lr=1.5e-3, weight_decay=0.1, row_tokens=448,
        question_weights={"color_of": 3.0, "where": 3.0, "relation": 3.0}, system_dropout=0.25,
        patch_loss_end=0.6, patch_loss_fade=0.1, threads=1)),
}


class Run:
    """One training run's whole state, one optimiser step at a time."""

    def __init__(self, spec: DemoSpec, cfg: TrainConfig):
        self.spec, self.cfg = spec, cfg
        torch.manual_seed(cfg.seed)
        self.processor = build_processor(spec, build_tokenizer(spec))
        self.model = LlavaForConditionalGeneration(build_config(spec, self.processor.tokenizer))
        self.head = PatchHead(spec.text_hidden, attribute_word_ids(self.processor.tokenizer))
        self.image_features: list[torch.Tensor] = []
        self.model.model.multi_modal_projector.register_forward_hook(
            lambda _m, _i, out: self.image_features.append(out))
        self.make_batch = BatchMaker(self.processor, spec, cfg.questions_per_image, cfg.row_tokens)
        self.stream = ExampleStream(spec, cfg.seed, cfg.question_weights, cfg.system_dropout)
        self.params = [*self.model.parameters(), *self.head.parameters()]
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in self.params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
             {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.98),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cfg.lr_factor)
        self.step = 0
        self.window: list[dict] = []  # metrics of the steps since the last log record
        self.history: list[dict] = []  # log records
        self.seconds = {"wall": 0.0, "cpu": 0.0}  # spent training, over every resumption
        self.resumes = 0

    @property
    def parameters_m(self) -> float:
        return sum(p.numel() for p in self.model.parameters()) / 1e6

    def train_step(self) -> None:
        """One optimiser step on a fresh batch; its metrics join the window."""
        weight = self.cfg.patch_weight(self.step)
        batch = self.make_batch([next(self.stream) for _ in range(self.cfg.batch_size)], with_patch_targets=weight > 0)
        self.image_features.clear()
        self.model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = self.model(**batch.inputs).logits
        loss, accuracy = answer_loss(logits, batch.labels)
        total = loss
        patch_loss = 0.0
        if weight > 0:
            patch = self.head(self.image_features[0], batch.patch_targets, self.model.get_input_embeddings().weight)
            total, patch_loss = loss + weight * patch, patch.item()
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.window.append({"loss": loss.item(), "token_accuracy": accuracy, "patch_loss": patch_loss,
                            "exact": segment_exact(logits, batch)})

    def log_record(self) -> dict:
        """Means over the window (which it empties): loss, token accuracy, patch loss and, per task,
        the share of segments whose every answer token was predicted (teacher-forced)."""
        n = len(self.window)
        exact: dict[str, list[int]] = {}
        for metrics in self.window:
            for task, (hits, total) in metrics["exact"].items():
                exact.setdefault(task, [0, 0])
                exact[task][0] += hits
                exact[task][1] += total
        record = {"step": self.step, **{k: sum(m[k] for m in self.window) / n for k in ("loss", "token_accuracy", "patch_loss")},
                  "lr": self.scheduler.get_last_lr()[0], "patch_weight": self.cfg.patch_weight(self.step - 1),
                  "exact": {task: hits / total for task, (hits, total) in sorted(exact.items())},
                  "wall_s": round(self.seconds["wall"], 1), "cpu_s": round(self.seconds["cpu"], 1)}
        self.window.clear()
        self.history.append(record)
        return record

    def state_dict(self) -> dict:
        return {"spec": self.spec.name, "config": recipe(self.cfg), "step": self.step,
                "model": self.model.state_dict(), "head": self.head.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "stream": self.stream.state_dict(), "torch_rng": torch.get_rng_state(),
                "window": self.window, "history": self.history, "seconds": self.seconds, "resumes": self.resumes}

    def load_state_dict(self, state: dict) -> None:
        if (state["spec"], state["config"]) != (self.spec.name, recipe(self.cfg)):
            raise ValueError(f"the checkpoint is of another recipe: {state['spec']} {state['config']}; "
                             f"this run is {self.spec.name} {recipe(self.cfg)}")
        self.model.load_state_dict(state["model"])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["stream"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.window, self.history = state["step"], state["window"], state["history"]
        self.seconds, self.resumes = state["seconds"], state["resumes"] + 1


def recipe(cfg: TrainConfig) -> dict:
    """The fields of a config that decide the weights (not how the run is executed)."""
    return {k: v for k, v in asdict(cfg).items() if k not in RUN_SETTINGS}


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Next-token cross-entropy and accuracy over labelled positions."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != IGNORE
    picked = logits[keep]
    target = labels[keep]
    loss = F.cross_entropy(picked.float(), target)
    accuracy = (picked.argmax(-1) == target).float().mean().item()
    return loss, accuracy


def segment_exact(logits: torch.Tensor, batch: Batch) -> dict[str, tuple[int, int]]:
    """Per task: (segments with every answer token the argmax, segments)."""
    labels, segment = batch.labels[:, 1:], batch.segment[:, 1:]
    wrong = (logits[:, :-1].argmax(-1) != labels) & (labels != IGNORE)
    most = max(map(len, batch.tasks)) + 1
    wrong_per_segment = torch.zeros(len(batch.tasks), most, dtype=torch.long).scatter_add_(
        1, segment.clamp(min=0), wrong.long())
    counts: dict[str, tuple[int, int]] = {}
    for row, tasks in enumerate(batch.tasks):
        for k, task in enumerate(tasks, start=1):
            hits, total = counts.get(task, (0, 0))
            counts[task] = (hits + int(wrong_per_segment[row, k] == 0), total + 1)
    return counts


def format_record(record: dict, steps: int) -> str:
    exact = " ".join(f"{task} {value:.2f}" for task, value in record["exact"].items())
    per_step = record["cpu_s"] / max(1, record["step"])
    return (f"step {record['step']}/{steps} loss {record['loss']:.4f} token_acc {record['token_accuracy']:.4f} "
            f"patch_loss {record['patch_loss']:.4f} lr {record['lr']:.2e} | exact {exact} | "
            f"{record['wall_s']:.0f} s wall {record['cpu_s']:.0f} s cpu ({per_step:.2f} cpu s/step)")


def train_demo(spec: DemoSpec, cfg: TrainConfig, out_dir: str | Path, checkpoint_dir: str | Path,
               log: Callable[[str], None] = print) -> dict:
    """Train (or resume training) a demo model and save it to `out_dir`; returns the last log record."""
    torch.set_num_threads(cfg.threads)
    run = Run(spec, cfg)
    checkpoint = Path(checkpoint_dir) / "checkpoint.pt"
    if checkpoint.exists():
        run.load_state_dict(torch.load(checkpoint, weights_only=False))
        log(f"resumed from {checkpoint} at step {run.step}")
    log(f"{spec.name}: {run.parameters_m:.2f} M parameters, {cfg.steps} steps of {cfg.batch_size} rows")
    wall, cpu = time.time(), time.process_time()
    saved = time.time()
    while run.step < cfg.steps:
        run.train_step()
        run.seconds["wall"] += time.time() - wall
        run.seconds["cpu"] += time.process_time() - cpu
        wall, cpu = time.time(), time.process_time()
        if run.step % cfg.log_every == 0 or run.step == cfg.steps:
            log(format_record(run.log_record(), cfg.steps))
        if time.time() - saved >= cfg.checkpoint_every_s or run.step == cfg.steps:
            save_checkpoint(run.state_dict(), checkpoint)
            saved = time.time()
    record = run.history[-1]
    save_demo(run.model, run.processor, spec, out_dir, {
        "spec": spec.name, "train_config": asdict(cfg), "parameters_m": round(run.parameters_m, 3),
        "final": record, "seconds": {k: round(v, 1) for k, v in run.seconds.items()}, "resumes": run.resumes,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "history": run.history,
    })
    return record


def save_checkpoint(state: dict, path: Path) -> None:
    """Write atomically: a run killed while saving keeps the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def save_demo(model: LlavaForConditionalGeneration, processor: LlavaProcessor, spec: DemoSpec,
              out_dir: str | Path, record: dict) -> None:
    """Write an HF-format directory: weights, config, processor (with the chat template), generation
    config, the training record (training.json) and its loss curve (loss_curve.png)."""
    out = Path(out_dir)
    tokenizer = processor.tokenizer
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=spec.max_new_tokens,
        do_sample=False,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    if record.get("history"):
        plot_history(record["history"], out / "loss_curve.png", title=f"{spec.name} training")
