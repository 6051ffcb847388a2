"""Importance = column sums of attention, recomputed in query chunks under sdpa, equal to eager's."""

import pytest
import torch
from transformers import DynamicCache

from conftest import encode
from elastic_ray.hf.cache import cache_keyword
from elastic_ray.hf.generate import generate_compressed
from elastic_ray.kv import ElasticCache, H2OCache
from elastic_ray.kv import importance
from elastic_ray.kv.entries import pack_order
from elastic_ray.kv.importance import IMPORTANCE, counted_queries, importance_from_probabilities, prompt_importance
from elastic_ray.models.family import family_of
from elastic_ray.models.synthetic import random_llava, random_qwen2_vl


def eager_probabilities(model, inputs):
    """Per layer [B, Hq, S, S]: eager attention probabilities (query rows, key columns)."""
    probs = []
    hooks = [
        layer.self_attn.register_forward_hook(lambda module, args, out: probs.append(out[1]))
        for layer in model.model.language_model.layers
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return probs


def eager_column_sums(model, inputs):
    """Per layer [B, Hq, S]: eager attention probabilities summed over real query rows."""
    real = inputs["attention_mask"].bool()
    return [(p * real[:, None, :, None]).sum(2) for p in eager_probabilities(model, inputs)]


@pytest.mark.parametrize("build", [random_llava, random_qwen2_vl], ids=["llava", "qwen2_vl_gqa"])
@pytest.mark.parametrize("chunk_elements", [importance.CHUNK_ELEMENTS, 64])
def test_scores_seen_by_the_method_equal_eager_column_sums(build, chunk_elements, images, monkeypatch):
    eager = build(attn_implementation="eager")
    sdpa = build(attn_implementation="sdpa")
    inputs = encode(sdpa, images)
    real = inputs["attention_mask"].bool()
    reference = eager_column_sums(eager[0], inputs)

    monkeypatch.setattr(importance, "CHUNK_ELEMENTS", chunk_elements)  # 64: one query row per chunk
    seen = {"mean": [], "kv": []}
    for cls, mode in ((ElasticCache, "mean"), (H2OCache, "kv")):
        original = cls.select_prompt

        def spy(self, scores, lengths, original=original, mode=mode, **inputs):
            seen[mode].append(scores.clone())
            return original(self, scores, lengths, **inputs)

        monkeypatch.setattr(cls, "select_prompt", spy)
        generate_compressed(sdpa[0], inputs, cls(budget=0.5), max_new_tokens=1)

    order = pack_order(real)
    kv_heads = sdpa[0].config.get_text_config().num_key_value_heads
    for layer, ref in enumerate(reference):
        packed = ref.gather(2, order[:, None, :].expand_as(ref))
        torch.testing.assert_close(seen["mean"][layer], packed.mean(1), rtol=0, atol=1e-5)
        groups = packed.view(packed.shape[0], kv_heads, -1, packed.shape[-1]).sum(2)
        torch.testing.assert_close(seen["kv"][layer], groups, rtol=0, atol=1e-5)


def test_pad_query_rows_add_nothing_and_pad_keys_get_nothing():
    queries, keys = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8)
    valid = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    sums = importance.attention_column_sums(queries, keys, 0.35, valid, valid, 0)
    assert torch.all(sums[0, :, :2] == 0)
    # Every real query row distributes probability 1: the row total is the number of real queries.
    torch.testing.assert_close(sums.sum(-1), valid.sum(1, keepdim=True).float().expand(2, 4))


def spy_on_select_prompt(monkeypatch, cls):
    """Record every call's (scores, lengths, image, keys) to `cls.select_prompt`."""
    calls = []
    original = cls.select_prompt

    def spy(self, scores, lengths, **inputs):
        calls.append((scores.clone(), lengths.clone(), inputs.get("image"), inputs.get("keys")))
        return original(self, scores, lengths, **inputs)

    monkeypatch.setattr(cls, "select_prompt", spy)
    return calls


@pytest.mark.parametrize("build", [random_llava, random_qwen2_vl], ids=["llava", "qwen2_vl_gqa"])
@pytest.mark.parametrize("mode", IMPORTANCE)
def test_each_importance_equals_its_definition_on_the_models_own_attention(build, mode, images, monkeypatch):
    eager, sdpa = build(attn_implementation="eager"), build(attn_implementation="sdpa")
    inputs = encode(sdpa, images)
    real = inputs["attention_mask"].bool()
    image = family_of(sdpa[0]).image_mask(inputs["input_ids"])
    assert bool(image.any(1).all()) and not bool(image[:, -1].any())  # the instruction follows the image
    probabilities = eager_probabilities(eager[0], inputs)
    calls = spy_on_select_prompt(monkeypatch, ElasticCache)
    generate_compressed(sdpa[0], inputs, ElasticCache(budget=0.5, importance=mode), max_new_tokens=1)
    for layer, probs in enumerate(probabilities):
        scores = calls[layer][0]
        for row in range(len(real)):
            columns = real[row].nonzero().flatten()
            own = probs[row][:, columns][:, :, columns]  # this row's prompt alone: its attention is the same
            reference = importance_from_probabilities(own, image[row, columns], mode)
            torch.testing.assert_close(scores[row, : len(columns)], reference, rtol=1e-5, atol=1e-6)


def test_the_hooks_hand_select_prompt_the_packed_image_mask_and_keys(tiny_qwen, images, monkeypatch):
    model, _ = tiny_qwen
    inputs = encode(tiny_qwen, images)
    order = pack_order(inputs["attention_mask"].bool())
    plain = DynamicCache()
    with torch.no_grad():
        model(**inputs, **{cache_keyword(model): plain}, use_cache=True)
    calls = spy_on_select_prompt(monkeypatch, ElasticCache)
    generate_compressed(model, inputs, ElasticCache(budget=0.5, assign="key"), max_new_tokens=1)
    image = family_of(model).image_mask(inputs["input_ids"]).gather(1, order)
    for layer, (_, _, seen_image, seen_keys) in enumerate(calls):
        assert torch.equal(seen_image, image)
        keys = plain.layers[layer].keys
        packed = keys.gather(2, order[:, None, :, None].expand_as(keys))
        torch.testing.assert_close(seen_keys, packed, rtol=0, atol=1e-6)


def test_instruction_counts_the_queries_after_the_last_image_token():
    real = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    image = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    counted = counted_queries(real, image, "instruction")
    assert counted.int().tolist() == [
        [0, 0, 0, 0, 1, 1],  # the two queries after the image
        [0, 0, 0, 0, 0, 1],  # the image ends the prompt: its last query alone
        [0, 0, 1, 1, 1, 1],  # no image: every real query
    ]
    assert torch.equal(counted_queries(real, image, "sum"), real)


def test_batched_importance_equals_the_single_sequence_definition():
    torch.manual_seed(0)
    lengths, width = [6, 9, 7], 9
    real = torch.arange(width)[None, :] >= (width - torch.tensor(lengths))[:, None]  # left padded
    image = torch.zeros(3, width, dtype=torch.bool)
    image[0, 4:6] = True  # the instruction follows
    image[1, 5:] = True  # the image ends the prompt
    queries, keys = torch.randn(3, 4, width, 8), torch.randn(3, 2, width, 8)
    for mode in IMPORTANCE:
        scores = prompt_importance(queries, keys, 0.35, real, image, mode, "mean")
        for row, length in enumerate(lengths):
            q, k = queries[row, :, -length:], keys[row, :, -length:].repeat_interleave(2, dim=0)
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            probs = (q @ k.transpose(-1, -2) * 0.35).masked_fill(~causal, float("-inf")).softmax(-1)
            reference = importance_from_probabilities(probs, image[row, -length:], mode)
            torch.testing.assert_close(scores[row, -length:], reference, rtol=1e-5, atol=1e-6)
            assert torch.all(scores[row, : width - length] == 0)
