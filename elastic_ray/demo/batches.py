"""Training rows for the demo VLMs: one image packed with several (instruction, answer) segments.

Every row draws a fresh train-split scene, so a model never sees a test scene. Each image is
trained on its caption (v2: and its description) and a few of its questions, packed as
independent single-turn segments; the language-model loss covers only the answer tokens and
the closing ``</s>``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import LlavaProcessor

from elastic_ray.data.shapes import CAPTION_INSTRUCTION, Scene
from elastic_ray.data.shapes_v2 import DESCRIPTION_INSTRUCTION, question_kind
from elastic_ray.demo.build import IMAGE_TOKEN, DemoSpec
from elastic_ray.demo.patch_loss import patch_targets

IGNORE = -100
LONG_TASKS = {CAPTION_INSTRUCTION: "caption", DESCRIPTION_INSTRUCTION: "description"}


def task_of(instruction: str) -> str:
    """What a segment trains: "caption", "description" or the kind of its question."""
    return LONG_TASKS.get(instruction) or question_kind(instruction)


@dataclass
class Example:
    """One training row's material: a scene, whether its prompt has the system prompt, its long
    targets and its questions in the order they are to be picked."""

    scene: Scene
    system: bool
    long_targets: list[tuple[str, str]]
    questions: list[tuple[str, str]]


class ExampleStream:
    """Endless examples from the train split, each scene's questions in a random order.

    The order is weighted sampling without replacement, kind `k` with weight
    `question_weights.get(k, 1)`; a row leaves out the system prompt with probability
    `system_dropout`. `state_dict` / `load_state_dict` make the stream resumable.
    """

    def __init__(self, spec: DemoSpec, seed: int, question_weights: dict[str, float], system_dropout: float = 0.0):
        self.spec, self.question_weights, self.system_dropout = spec, question_weights, system_dropout
        self.rng = spec.scene_rng(seed, "train")
        self.scenes = spec.scenes_from(self.rng, "train")
        self.picker = random.Random(seed)

    def __iter__(self):
        return self

    def __next__(self) -> Example:
        scene = next(self.scenes)
        # weighted sampling without replacement: the largest u ** (1 / weight) win
        keys = [self.picker.random() ** (1 / self.question_weights.get(question_kind(q), 1.0)) for q, _ in scene.qa]
        order = sorted(range(len(keys)), key=keys.__getitem__, reverse=True)
        system = not (self.system_dropout and self.picker.random() < self.system_dropout)
        return Example(scene, system, scene.long_targets, [scene.qa[i] for i in order])

    def state_dict(self) -> dict:
        """Everything the rest of the stream depends on (between two examples)."""
        return {"scenes": self.rng.bit_generator.state, "picker": self.picker.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["scenes"]
        self.scenes = self.spec.scenes_from(self.rng, "train")
        self.picker.setstate(state["picker"])


@dataclass
class Batch:
    """Model inputs, labels, and which segment (1, 2, ...; 0 prefix, -1 padding) each position is in."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor  # (B, T), IGNORE where there is no answer token
    segment: torch.Tensor  # (B, T)
    tasks: list[list[str]]  # per row, the task of segments 1, 2, ...
    patch_targets: torch.Tensor | None  # (B, patches, 4), when asked for


class BatchMaker:
    """Packs one image and several (instruction, answer) segments into each row.

    The segments share the image prefix ``<s>{system} USER: <image>...\\n``; a 4-D mask lets each
    one see only the prefix and itself, and its positions restart after the prefix. Each segment
    thus trains exactly like its own single-turn example, without re-encoding the image.
    A row holds the example's long targets, then its first `questions_per_image` questions, or,
    with `row_tokens`, as many as fit in that many tokens (padding would cost as much).
    """

    def __init__(self, processor: LlavaProcessor, spec: DemoSpec, questions_per_image: int = 4,
                 row_tokens: int = 0):
        self.processor, self.spec = processor, spec
        self.questions_per_image, self.row_tokens = questions_per_image, row_tokens
        self.tokenizer = processor.tokenizer
        self.prefixes = {system: self._ids(spec.prompt_template(system).split("{prompt}")[0]) for system in (True, False)}
        self._prompts: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        """Token ids with ``<image>`` expanded, as the processor produces them."""
        return self.tokenizer(text.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.spec.image_tokens)).input_ids

    def prompt_ids(self, instruction: str) -> list[int]:
        """The prompt's tokens after the shared prefix (the same with or without the system prompt)."""
        if instruction not in self._prompts:
            for system, prefix in self.prefixes.items():
                ids = self._ids(self.spec.format_prompt(instruction, system))
                assert ids[: len(prefix)] == prefix, "prompt does not start with the shared prefix"
            self._prompts[instruction] = ids[len(prefix):]
        return self._prompts[instruction]

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(" " + answer, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]

    def segments(self, example: Example) -> list[tuple[list[int], list[int], str]]:
        """(prompt ids, answer ids, task) of the segments packed after the example's prefix."""
        chosen = [(self.prompt_ids(i), self.answer_ids(a), task_of(i)) for i, a in example.long_targets]
        length = len(self.prefixes[example.system]) + sum(len(p) + len(t) for p, t, _ in chosen)
        questions = example.questions if self.row_tokens else example.questions[:self.questions_per_image]
        for instruction, answer in questions:
            prompt, target = self.prompt_ids(instruction), self.answer_ids(answer)
            length += len(prompt) + len(target)
            if self.row_tokens and length > self.row_tokens:
                break
            chosen.append((prompt, target, task_of(instruction)))
        return chosen

    def __call__(self, rows: list[Example], with_patch_targets: bool = False) -> Batch:
        packed, tasks = [], []
        for row in rows:
            prefix = self.prefixes[row.system]
            n = len(prefix)
            ids, seg, pos, lab = list(prefix), [0] * n, list(range(n)), [IGNORE] * n
            segments = self.segments(row)
            tasks.append([task for _, _, task in segments])
            for k, (prompt, target, _) in enumerate(segments, start=1):
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
        scenes = [row.scene for row in rows]
        pixels = self.processor.image_processor([s.image for s in scenes], return_tensors="pt")
        targets = None
        if with_patch_targets:
            targets = torch.stack([patch_targets(s, self.spec.patch_size) for s in scenes])
        return Batch(
            inputs={"input_ids": input_ids, "attention_mask": mask[:, None], "position_ids": position_ids,
                    "pixel_values": pixels.pixel_values},
            labels=labels, segment=segment, tasks=tasks,
            patch_targets=targets,
        )
