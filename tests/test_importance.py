"""Importance = column sums of attention, recomputed in query chunks under sdpa, equal to eager's."""

import pytest
import torch

from conftest import INSTRUCTIONS, encode
from elastic_ray import EngineConfig, SamplingParams
from elastic_ray.engine.engine import Engine
from elastic_ray.hf.generate import generate_compressed
from elastic_ray.kv import ElasticCache, H2OCache
from elastic_ray.kv import importance
from elastic_ray.kv.entries import pack_order
from elastic_ray.models.synthetic import random_llava, random_qwen2_vl


def eager_column_sums(model, inputs):
    """Per layer [B, Hq, S]: eager attention probabilities summed over real query rows."""
    real = inputs["attention_mask"].bool()
    sums = []
    hooks = [
        layer.self_attn.register_forward_hook(
            lambda module, args, out: sums.append((out[1] * real[:, None, :, None]).sum(2))
        )
        for layer in model.model.language_model.layers
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return sums


def run_prompt_stage(path: str, model, inputs, images, policy):
    """The prompt stage of `policy` on the three prompts, through generate() or through the engine."""
    if path == "generate":
        generate_compressed(model[0], inputs, policy, max_new_tokens=1)
        return
    engine = Engine(*model, policy, EngineConfig(max_num_seqs=3, max_tokens=1))
    outputs = engine.generate([{"image": i, "prompt": t} for i, t in zip(images, INSTRUCTIONS)], SamplingParams(max_tokens=1))
    assert engine.steps == {"prefill": 1, "decode": 0} and all(o.finish_reason == "length" for o in outputs)


@pytest.mark.parametrize("build", [random_llava, random_qwen2_vl], ids=["llava", "qwen2_vl_gqa"])
@pytest.mark.parametrize("chunk_elements", [importance.CHUNK_ELEMENTS, 64])
@pytest.mark.parametrize("path", ["generate", "engine"])
def test_scores_seen_by_the_method_equal_eager_column_sums(build, chunk_elements, path, images, monkeypatch):
    eager = build(attn_implementation="eager")
    sdpa = build(attn_implementation="sdpa")
    inputs = encode(sdpa, images)
    real = inputs["attention_mask"].bool()
    reference = eager_column_sums(eager[0], inputs)

    monkeypatch.setattr(importance, "CHUNK_ELEMENTS", chunk_elements)  # 64: one query row per chunk
    seen = {"mean": [], "kv": []}
    for cls, mode in ((ElasticCache, "mean"), (H2OCache, "kv")):
        original = cls.select_prompt

        def spy(self, scores, lengths, original=original, mode=mode):
            seen[mode].append(scores.clone())
            return original(self, scores, lengths)

        monkeypatch.setattr(cls, "select_prompt", spy)
        run_prompt_stage(path, sdpa, inputs, images, cls(budget=0.5))

    order = pack_order(real)
    kv_heads = sdpa[0].config.get_text_config().num_key_value_heads
    for layer, ref in enumerate(reference):
        packed = ref.gather(2, order[:, None, :].expand_as(ref))
        torch.testing.assert_close(seen["mean"][layer], packed.mean(1), rtol=0, atol=1e-5)
        groups = packed.view(packed.shape[0], kv_heads, -1, packed.shape[-1]).sum(2)
        torch.testing.assert_close(seen["kv"][layer], groups, rtol=0, atol=1e-5)


@pytest.mark.parametrize("policy", [ElasticCache(budget=0.5), H2OCache(budget=0.5)], ids=["elastic", "h2o"])
def test_the_engine_scores_from_each_layers_own_queries_without_recomputing_them(policy, tiny_llava, images):
    projections = [layer.self_attn.q_proj for layer in tiny_llava[0].model.language_model.layers]
    calls = []
    hooks = [q.register_forward_hook(lambda module, args, out: calls.append(module)) for q in projections]
    try:
        engine = Engine(*tiny_llava, policy, EngineConfig(max_num_seqs=3, max_tokens=4))
        engine.generate([{"image": i, "prompt": t} for i, t in zip(images, INSTRUCTIONS)],
                        SamplingParams(max_tokens=4, ignore_eos=True))
    finally:
        for hook in hooks:
            hook.remove()
    steps = engine.steps["prefill"] + engine.steps["decode"]
    assert engine.steps["prefill"] == 1 and len(calls) == steps * len(projections)  # once per layer per forward


def test_pad_query_rows_add_nothing_and_pad_keys_get_nothing():
    queries, keys = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8)
    valid = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    sums = importance.attention_column_sums(queries, keys, 0.35, valid, valid, 0)
    assert torch.all(sums[0, :, :2] == 0)
    # Every real query row distributes probability 1: the row total is the number of real queries.
    torch.testing.assert_close(sums.sum(-1), valid.sum(1, keepdim=True).float().expand(2, 4))
