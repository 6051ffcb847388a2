"""Demo training: packed segments act alone, patch labels match the scene, and a run is seeded,
resumable and ends in a loadable model."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

from elastic_ray.data.shapes import CELLS, make_scenes
from elastic_ray.data.shapes_v2 import make_detailed_scenes
from elastic_ray.demo.batches import IGNORE, BatchMaker, Example, ExampleStream
from elastic_ray.demo.build import DEMO_V1, DEMO_V2, build_config, build_processor, build_tokenizer
from elastic_ray.demo.patch_loss import ATTRIBUTES, PatchHead, attribute_word_ids, patch_targets
from elastic_ray.demo.train import CONFIGS, TrainConfig, train_demo

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=2, corpus_scenes=200)
TINY_V2 = replace(DEMO_V2, **SMALL)
TINY_RUN = TrainConfig(steps=6, batch_size=2, warmup=2, row_tokens=400, system_dropout=0.5, patch_loss_end=0.5,
                       patch_loss_fade=0.2, question_weights={"where": 3.0}, threads=1, log_every=1,
                       checkpoint_every_s=0)


def _parts(spec):
    processor = build_processor(spec, build_tokenizer(spec))
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(build_config(spec, processor.tokenizer)).eval()
    return processor, model


@pytest.fixture(scope="module", params=["v1", "v2"])
def parts(request):
    """(spec, processor, tiny random model) of each demo model's format."""
    spec = replace(DEMO_V1, **SMALL) if request.param == "v1" else TINY_V2
    return (spec, *_parts(spec))


def test_prompt_ids_match_processor(parts):
    spec, processor, _ = parts
    make_batch = BatchMaker(processor, spec)
    scene = spec.scenes(1)[0]
    for system in (True, False):
        for question, _ in [*scene.long_targets, *scene.qa[:3]]:
            inputs = processor(images=[scene.image], text=[spec.format_prompt(question, system)])
            assert inputs["input_ids"][0] == make_batch.prefixes[system] + make_batch.prompt_ids(question)
    assert (len(make_batch.prefixes[True]) > len(make_batch.prefixes[False])) == bool(spec.system_prompt)


def test_packed_segments_match_single_examples(parts):
    spec, processor, model = parts
    make_batch = BatchMaker(processor, spec, questions_per_image=3)
    stream = ExampleStream(spec, seed=0, question_weights={}, system_dropout=0.5 if spec.system_prompt else 0.0)
    rows = [next(stream) for _ in range(4)]
    assert {row.system for row in rows} == ({True, False} if spec.system_prompt else {True})
    batch = make_batch(rows)
    with torch.no_grad():
        packed = model(**batch.inputs).logits
    for r, row in enumerate(rows):
        prefix = make_batch.prefixes[row.system]
        segments = make_batch.segments(row)
        assert batch.tasks[r][:len(row.long_targets)] == (["caption", "description"] if spec is TINY_V2 else ["caption"])
        assert len(segments) == len(row.long_targets) + 3
        start = len(prefix)
        for prompt, target, _ in segments:
            ids = torch.tensor([prefix + prompt + target])
            with torch.no_grad():
                alone = model(input_ids=ids, pixel_values=batch.inputs["pixel_values"][r:r + 1]).logits
            end = start + len(prompt) + len(target)
            torch.testing.assert_close(packed[r, start:end], alone[0, len(prefix):], atol=1e-4, rtol=1e-4)
            assert batch.labels[r, start:end].tolist() == [IGNORE] * len(prompt) + target
            start = end


def test_rows_take_as_many_questions_as_fit():
    processor, _ = _parts(TINY_V2)
    scene = make_detailed_scenes(20, seed=1)[-1]
    example = Example(scene, True, scene.long_targets, scene.qa)
    for budget in (300, 420, 2000):
        make_batch = BatchMaker(processor, TINY_V2, row_tokens=budget)
        segments = make_batch.segments(example)
        length = len(make_batch.prefixes[True]) + sum(len(p) + len(t) for p, t, _ in segments)
        taken = len(segments) - len(scene.long_targets)
        assert length <= budget or taken == 0
        if taken < len(scene.qa):
            prompt, target = make_batch.prompt_ids(scene.qa[taken][0]), make_batch.answer_ids(scene.qa[taken][1])
            assert length + len(prompt) + len(target) > budget
    assert taken == len(scene.qa) > 10


def test_patch_targets_follow_the_objects():
    # band of each patch row/column when the patch lies inside one grid band, else None
    band = [p * 8 * 3 // 112 if (p * 8 + 7) * 3 // 112 == p * 8 * 3 // 112 else None for p in range(14)]
    for scene in make_scenes(20, seed=2, split="train"):
        targets = patch_targets(scene, patch=8).reshape(14, 14, 4)
        assert targets[..., 0].unique().tolist() == list(range(len(CELLS)))
        labels = {tuple(1 + words.index(w) for words, w in zip(ATTRIBUTES, (o.shape, o.color, o.size)))
                  for o in scene.objects}
        assert {tuple(t) for t in targets[..., 1:].reshape(-1, 3).tolist()} == labels | {(0, 0, 0)}
        for o in scene.objects:
            row, col = divmod(o.cell, 3)
            centre = targets[round((row + 0.5) * 14 / 3 - 0.5), round((col + 0.5) * 14 / 3 - 0.5)]
            assert centre[0] == o.cell
            assert centre[1:].tolist() == [1 + words.index(w) for words, w in zip(ATTRIBUTES, (o.shape, o.color, o.size))]
        empty = set(range(len(CELLS))) - {o.cell for o in scene.objects}
        for r in range(14):
            for c in range(14):
                if band[r] is not None and band[c] is not None and band[r] * 3 + band[c] in empty:
                    assert targets[r, c, 1:].tolist() == [0, 0, 0]


def test_v2_patch_targets_follow_the_object_map():
    for scene in make_detailed_scenes(20, seed=2):
        targets = patch_targets(scene, patch=16)
        shown = torch.from_numpy(scene.object_map).reshape(14, 16, 14, 16).permute(0, 2, 1, 3).reshape(196, 256)
        for p in range(196):
            counts = torch.bincount(shown[p].long(), minlength=len(scene.objects) + 1)[1:]
            if counts.max() < 16:
                assert targets[p, 1:].tolist() == [0, 0, 0]
            else:
                o = scene.objects[counts.argmax()]
                assert targets[p, 1:].tolist() == [1 + words.index(w) for words, w in zip(ATTRIBUTES, (o.shape, o.color, o.size))]


def test_patch_head_scores_against_word_embeddings(parts):
    spec, processor, model = parts
    word_ids = attribute_word_ids(processor.tokenizer)
    assert [len(ids) for ids in word_ids] == [len(words) for words in ATTRIBUTES]
    head = PatchHead(model.config.text_config.hidden_size, word_ids)
    targets = patch_targets(spec.scenes(1)[0], patch=spec.patch_size)[None]
    features = torch.randn(1, spec.image_tokens, model.config.text_config.hidden_size, requires_grad=True)
    embeddings = model.get_input_embeddings().weight
    loss = head(features, targets, embeddings)
    loss.backward()
    assert loss.item() > 0 and embeddings.grad[word_ids[0]].abs().sum() > 0


def test_patch_loss_schedule_and_learning_rate():
    cfg = TrainConfig(steps=100, warmup=10, patch_loss_weight=2.0, patch_loss_end=0.6, patch_loss_fade=0.2)
    assert [cfg.patch_weight(s) for s in (0, 39, 40, 50, 59, 60, 99)] == pytest.approx([2, 2, 2, 1, 0.1, 0, 0])
    assert TrainConfig(steps=100).patch_weight(99) == 1.0  # v1: throughout
    assert [cfg.lr_factor(s) for s in (0, 9, 10, 99)] == pytest.approx([0.1, 1, 1, 0.05], abs=1e-3)
    _, v2 = CONFIGS["demo-v2"]
    assert v2.patch_weight(int(0.6 * v2.steps)) == 0  # no patch loss in the final 40 %


class Interrupted(Exception):
    pass


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    """Stopped after step 5 (its last checkpoint is step 4's), rerun: the same weights and log as a
    run never stopped; a checkpoint of another recipe is refused."""
    whole = train_demo(TINY_V2, TINY_RUN, tmp_path / "whole", tmp_path / "whole-ckpt", log=lambda _: None)

    def stop_at_step_5(line: str) -> None:
        if line.startswith("step 5/"):
            raise Interrupted

    with pytest.raises(Interrupted):
        train_demo(TINY_V2, TINY_RUN, tmp_path / "cut", tmp_path / "cut-ckpt", log=stop_at_step_5)
    assert torch.load(tmp_path / "cut-ckpt" / "checkpoint.pt", weights_only=False)["step"] == 4
    lines = []
    resumed = train_demo(TINY_V2, TINY_RUN, tmp_path / "cut", tmp_path / "cut-ckpt", log=lines.append)
    assert lines[0].startswith("resumed from") and "at step 4" in lines[0]
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("wall_s", "cpu_s")}  # noqa: E731
    history = [json.loads((tmp_path / d / "training.json").read_text())["history"] for d in ("whole", "cut")]
    assert [strip(r) for r in history[0]] == [strip(r) for r in history[1]] and strip(whole) == strip(resumed)
    assert json.loads((tmp_path / "cut" / "training.json").read_text())["resumes"] == 1

    other = replace(TINY_RUN, lr=1e-3)
    with pytest.raises(ValueError, match="another recipe"):
        train_demo(TINY_V2, other, tmp_path / "cut", tmp_path / "cut-ckpt", log=lambda _: None)
    train_demo(TINY_V2, replace(TINY_RUN, threads=2, log_every=3), tmp_path / "cut", tmp_path / "cut-ckpt",
               log=lambda _: None)  # how a run executes may change on resuming


@pytest.mark.slow
def test_few_steps_write_a_loadable_model(tmp_path):
    from elastic_ray import LLM, SamplingParams
    from elastic_ray.models.loading import load

    train_demo(TINY_V2, replace(TINY_RUN, steps=2), tmp_path / "model", tmp_path / "ckpt", log=lambda _: None)
    names = {p.name for p in (tmp_path / "model").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "processor_config.json",
            "chat_template.jinja", "training.json", "loss_curve.png"} <= names
    record = json.loads((tmp_path / "model" / "training.json").read_text())
    assert record["train_config"]["steps"] == 2 and record["seconds"]["cpu"] > 0 and len(record["history"]) == 2
    model, processor = load(str(tmp_path / "model"))
    assert model.config.text_config.num_hidden_layers == 2 and model.generation_config.max_new_tokens == 128
    scene = make_detailed_scenes(1, split="test")[0]
    assert processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
        add_generation_prompt=True) == TINY_V2.format_prompt("Describe the image.")
    out = LLM((model, processor)).generate([{"image": scene.image, "prompt": "Describe the image."}],
                                            SamplingParams(max_tokens=4))
    make_batch = BatchMaker(processor, TINY_V2)
    assert out[0].stats["prompt_tokens"] == len(make_batch.prefixes[True]) + len(make_batch.prompt_ids("Describe the image."))


@pytest.mark.slow
def test_the_training_job_continues_when_run_again(tmp_path):
    command = [sys.executable, "jobs/train_demo.py", "--config", "demo-v2", "--out", str(tmp_path / "m"),
               "--steps", "2", "--batch-size", "1", "--threads", "1", "--log-every", "1"]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "step 2/2" in first.stdout and (tmp_path / "m-checkpoints" / "checkpoint.pt").exists()
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout and "at step 2" in again.stdout and "step 1/2" not in again.stdout
