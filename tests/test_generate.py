"""transformers' generate() on the compressed cache: identity, batch = alone, masked reference."""

import pytest
import torch
from transformers import DynamicCache

from conftest import encode
from elastic_ray.hf.cache import cache_keyword, passed_cache
from elastic_ray.hf.generate import generate_compressed
from elastic_ray.kv import make_policy

STEPS = 24
GREEDY = dict(max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True)
METHODS = [
    ("elastic", {}),
    ("elastic", {"merge": False}),
    ("elastic", {"offset": 4}),
    ("elastic", {"protect_text": True}),
    ("elastic-vl", {"protect_prefix": False}),
    ("elastic", {"importance": "mean"}),
    ("elastic", {"importance": "instruction"}),
    ("elastic", {"assign": "key"}),
    ("elastic-vl", {}),
    ("h2o", {}),
    ("streaming", {}),
]


@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_llava_eager"])
def test_elastic_at_budget_one_equals_the_full_cache_and_plain_generate(fixture, request, images):
    model, processor = request.getfixturevalue(fixture)
    inputs = encode((model, processor), images)
    assert inputs["attention_mask"].sum(1).unique().numel() == 3  # three lengths: left padding
    reference = model.generate(**inputs, **GREEDY)
    full, _ = generate_compressed(model, inputs, make_policy("full"), **GREEDY)
    elastic, _ = generate_compressed(model, inputs, make_policy("elastic", 1.0), **GREEDY)
    for run in (full, elastic):
        assert torch.equal(run.sequences, reference.sequences)
        for got, want in zip(run.logits, reference.logits):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,options", METHODS)
def test_each_row_of_a_padded_batch_generates_what_it_generates_alone(method, options, tiny_vlm, images):
    policy = make_policy(method, 0.5, **options)
    batch, _ = generate_compressed(tiny_vlm[0], encode(tiny_vlm, images), policy, **GREEDY)
    for row in range(3):
        alone, _ = generate_compressed(tiny_vlm[0], encode(tiny_vlm, images[row:], [_instruction(row)]), policy, **GREEDY)
        assert torch.equal(batch.sequences[row, -STEPS:], alone.sequences[0, -STEPS:])


def _instruction(row):
    from conftest import INSTRUCTIONS

    return INSTRUCTIONS[row]


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_new_tokens_rotate_at_their_true_index_or_at_the_cache_length(positions, tiny_llava, images):
    inputs = encode(tiny_llava, images)
    seen = []
    first_attention = tiny_llava[0].model.language_model.layers[0].self_attn
    hook = first_attention.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"].clone()), with_kwargs=True
    )
    try:
        _, cache = generate_compressed(tiny_llava[0], inputs, make_policy("elastic", 0.5, positions=positions), **GREEDY)
    finally:
        hook.remove()
    prompt_lengths = inputs["attention_mask"].sum(1)
    for step in range(1, STEPS):
        expected = cache.history[step - 1][0] if positions == "compact" else prompt_lengths + step - 1
        assert seen[step][:, 0].tolist() == expected.tolist()


def test_compact_positions_are_refused_for_m_rope_models(tiny_qwen, images):
    with pytest.raises(ValueError, match="allowed: \\['original'\\]"):
        generate_compressed(tiny_qwen[0], encode(tiny_qwen, images), make_policy("elastic", 0.5, positions="compact"))


@pytest.mark.slow
@pytest.mark.parametrize("method,options", [("elastic", {"merge": False}), ("streaming", {})])
@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_llava_eager"])
def test_eviction_only_methods_equal_a_full_cache_that_masks_the_dropped_columns(method, options, fixture, request, images):
    model, processor = request.getfixturevalue(fixture)
    inputs = encode((model, processor), images)
    held = []  # per forward: each layer's original positions [B, W] after that forward
    record = model.model.language_model.register_forward_hook(
        lambda module, args, kwargs, out: held.append([l.positions[:, 0].clone() for l in passed_cache(kwargs).layers]),
        with_kwargs=True,
    )
    try:
        out, _ = generate_compressed(model, inputs, make_policy(method, 0.4, **options), **GREEDY)
    finally:
        record.remove()
    assert held[-1][0].shape[1] < inputs["input_ids"].shape[1]  # the cache really shrank
    reference = _masked_reference(model, inputs, out.sequences, held)
    for step, (got, want) in enumerate(zip(out.logits, reference)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"step {step}")


def _masked_reference(model, inputs, sequences, held):
    """Teacher-force `sequences` through a plain DynamicCache; each layer's mask hides the columns
    that the compressed run no longer held at that step."""
    eager = model.config.get_text_config()._attn_implementation == "eager"
    mask2d = inputs["attention_mask"].bool()
    batch, width = mask2d.shape
    pads = width - mask2d.sum(1)
    position_ids = (mask2d.long().cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache()
    logits = []
    current = {"layer_masks": None}

    def pre_hook(module, args, kwargs):
        if current["layer_masks"] is not None:
            allowed = current["layer_masks"][module.layer_idx][:, None, None, :]
            kwargs["attention_mask"] = (
                torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min) if eager else allowed
            )
        return args, kwargs

    attentions = [layer.self_attn for layer in model.model.language_model.layers]
    handles = [a.register_forward_pre_hook(pre_hook, with_kwargs=True) for a in attentions]
    try:
        with torch.no_grad():
            out = model(**inputs, **{cache_keyword(model): cache}, position_ids=position_ids, use_cache=True)
            logits.append(out.logits[:, -1])
            for step in range(1, len(held)):
                token = sequences[:, width + step - 1 : width + step]
                columns = width + step  # keys in the full cache after appending this token
                masks = []
                for positions in held[step - 1]:  # what each layer held before this step
                    allowed = torch.zeros(batch, columns, dtype=torch.bool)
                    for row in range(batch):
                        kept = positions[row][positions[row] >= 0]
                        prompt_len = int(mask2d[row].sum())
                        cols = torch.where(kept < prompt_len, kept + pads[row], width + kept - prompt_len)
                        allowed[row, cols] = True
                    allowed[:, -1] = True  # the token being fed
                    masks.append(allowed)
                current["layer_masks"] = masks
                next_pos = position_ids[:, -1:] + step
                out = model(input_ids=token, **{cache_keyword(model): cache}, position_ids=next_pos, use_cache=True,
                            attention_mask=torch.ones(batch, columns, dtype=torch.long))
                logits.append(out.logits[:, -1])
    finally:
        for handle in handles:
            handle.remove()
    return logits


@pytest.mark.slow
@pytest.mark.parametrize("method,options", METHODS + [("full", {})])
def test_cache_length_is_c0_after_the_prompt_and_follows_the_rule_while_decoding(method, options, tiny_llava, images):
    inputs = encode(tiny_llava, images)
    budget = 1.0 if method == "full" else 0.3
    policy = make_policy(method, budget, **options)
    _, cache = generate_compressed(tiny_llava[0], inputs, policy, max_new_tokens=60, do_sample=False)
    lengths = inputs["attention_mask"].sum(1).tolist()
    for row, prompt_len in enumerate(lengths):
        expected = policy.prompt_kept(prompt_len)
        assert cache.history[0][:, row].tolist() == [expected] * len(cache.layers)
        for step, counts in enumerate(cache.history[1:], start=1):
            expected += 1
            if policy.evicts and expected >= budget * (prompt_len + step) + 1 - 1e-6:
                expected -= 1
            assert counts[:, row].tolist() == [expected] * len(cache.layers)
        assert max(int(h[:, row].max()) for h in cache.history) < policy.peak_entries(prompt_len, 60)
    for layer in cache.layers:  # every layer stores the same count per row
        assert torch.equal(layer.lengths, cache.layers[0].lengths)


def test_sampling_runs_on_the_compressed_cache_and_is_reproducible(tiny_llava, images):
    inputs = encode(tiny_llava, images)
    policy = make_policy("elastic", 0.5)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        out, _ = generate_compressed(tiny_llava[0], inputs, policy, max_new_tokens=16, do_sample=True, temperature=1.0)
        runs.append(out)
    assert torch.equal(runs[0], runs[1])
    greedy, _ = generate_compressed(tiny_llava[0], inputs, policy, max_new_tokens=16, do_sample=False)
    assert not torch.equal(runs[0], greedy)
