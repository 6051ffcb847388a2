"""Demo training internals: packed segments act alone; patch labels match the scene."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from elastic_ray.data.shapes import CELLS, make_scenes
from elastic_ray.models.demo_build import build_config, build_processor, build_tokenizer, format_prompt
from elastic_ray.models.demo_patch_loss import ATTRIBUTES, PatchHead, attribute_word_ids, patch_targets
from elastic_ray.models.demo_train import IGNORE, BatchMaker, examples


@pytest.fixture(scope="module")
def parts():
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    config = build_config(tokenizer, vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=2)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    return processor, model, BatchMaker(processor, config.image_seq_length)


def test_prompt_ids_match_processor(parts):
    processor, _, make_batch = parts
    scene = make_scenes(1, seed=0, split="train")[0]
    for question, _ in scene.qa[:3]:
        inputs = processor(images=[scene.image], text=[format_prompt(question)])
        assert inputs["input_ids"][0] == make_batch.prefix + make_batch.prompt_ids(question)


def test_packed_segments_match_single_examples(parts):
    _, model, make_batch = parts
    rows = [next(examples(seed=0, questions_per_image=3)) for _ in range(2)]
    batch = make_batch(rows)
    labels = batch.pop("labels")
    batch.pop("patch_targets")
    with torch.no_grad():
        packed = model(**batch).logits
    scene, segments = rows[0]
    start = len(make_batch.prefix)
    for instruction, answer in segments:
        segment = make_batch.prompt_ids(instruction) + make_batch.answer_ids(answer)
        ids = torch.tensor([make_batch.prefix + segment])
        with torch.no_grad():
            alone = model(input_ids=ids, pixel_values=batch["pixel_values"][:1]).logits
        end = start + len(segment)
        torch.testing.assert_close(packed[0, start:end], alone[0, len(make_batch.prefix):], atol=1e-4, rtol=1e-4)
        assert labels[0, start:end].tolist() == [IGNORE] * (len(segment) - len(make_batch.answer_ids(answer))) \
            + make_batch.answer_ids(answer)
        start = end


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


def test_patch_head_scores_against_word_embeddings(parts):
    processor, model, _ = parts
    word_ids = attribute_word_ids(processor.tokenizer)
    assert [len(ids) for ids in word_ids] == [len(words) for words in ATTRIBUTES]
    head = PatchHead(model.config.text_config.hidden_size, word_ids)
    scene = make_scenes(1, seed=0, split="train")[0]
    targets = patch_targets(scene, patch=8)[None]
    features = torch.randn(1, 196, model.config.text_config.hidden_size, requires_grad=True)
    embeddings = model.get_input_embeddings().weight
    loss = head(features, targets, embeddings)
    loss.backward()
    assert loss.item() > 0 and embeddings.grad[word_ids[0]].abs().sum() > 0
