"""The public API: LLM(model, cache=...).generate(requests, SamplingParams(...))."""

import math

import pytest

from conftest import INSTRUCTIONS
from elastic_ray import LLM, CacheConfig, EngineConfig, SamplingParams
from elastic_ray.config import GREEDY_BELOW, SamplingError
from elastic_ray.hf.static import StaticBatchGenerator


def requests(images):
    return [{"image": image, "prompt": text} for image, text in zip(images, INSTRUCTIONS)]


def test_stats_show_the_prompt_cache_at_budget_times_the_full_cache(tiny_llava, images):
    full = LLM(tiny_llava).generate(requests(images), SamplingParams(max_tokens=8, ignore_eos=True))
    half = LLM(tiny_llava, cache=CacheConfig(method="elastic", budget=0.5)).generate(
        requests(images), SamplingParams(max_tokens=8, ignore_eos=True)
    )
    for f, h in zip(full, half):
        prompt = f.stats["prompt_tokens"]
        assert f.stats["kv_entries_prompt"] == [prompt, prompt]
        assert h.stats["kv_entries_prompt"] == [prompt - int(prompt * 0.5 + 1e-6)] * 2
        assert h.stats["kv_bytes"] < f.stats["kv_bytes"] == f.stats["kv_bytes_full"]
        assert f.stats["output_tokens"] == len(f.token_ids) == 8
        assert f.finish_reason == "length"


def test_budget_one_elastic_generates_what_the_full_cache_generates(tiny_llava, images):
    params = SamplingParams(max_tokens=12)
    full = LLM(tiny_llava).generate(requests(images), params)
    elastic = LLM(tiny_llava, cache=CacheConfig(method="elastic", budget=1.0)).generate(requests(images), params)
    assert [o.token_ids for o in full] == [o.token_ids for o in elastic]


def test_outputs_come_in_request_order_whatever_the_slot_count(tiny_llava, images):
    params = SamplingParams(max_tokens=6)
    wide = LLM(tiny_llava, engine=EngineConfig(max_num_seqs=8)).generate(requests(images), params)
    narrow = LLM(tiny_llava, engine=EngineConfig(max_num_seqs=1)).generate(requests(images), params)
    assert [o.request_id for o in narrow] == [o.request_id for o in wide] == [0, 1, 2]
    assert [o.token_ids for o in wide] == [o.token_ids for o in narrow]


def test_the_static_reference_path_splits_batches_and_keeps_order(tiny_llava, images):
    params = SamplingParams(max_tokens=6)
    policy = CacheConfig("elastic", 0.5).policy
    whole = StaticBatchGenerator(*tiny_llava, policy, max_batch_size=8).generate(requests(images), params)
    split = StaticBatchGenerator(*tiny_llava, policy, max_batch_size=1).generate(requests(images), params)
    assert [o.request_id for o in split] == [0, 1, 2]
    assert [o.token_ids for o in whole] == [o.token_ids for o in split]


def test_generation_stops_at_eos_and_at_stop_strings(tiny_llava, images):
    llm = LLM(tiny_llava)
    free = llm.generate(requests(images)[:1], SamplingParams(max_tokens=12))[0]
    eos = llm.tokenizer.eos_token_id
    forced = free.token_ids[3]
    llm.model.generation_config.eos_token_id = forced  # make the 4th generated token end the text
    try:
        stopped = llm.generate(requests(images)[:1], SamplingParams(max_tokens=12))[0]
    finally:
        llm.model.generation_config.eos_token_id = None
    assert stopped.finish_reason == "stop" and stopped.token_ids[-1] == forced
    assert len(stopped.token_ids) == free.token_ids.index(forced) + 1
    words = free.text.split()
    cut = llm.generate(requests(images)[:1], SamplingParams(max_tokens=12, stop=[words[2]]))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.index(words[2])].strip()
    assert cut.token_ids == free.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < len(free.token_ids)
    assert eos is not None


def test_seeded_sampling_is_reproducible(tiny_llava, images):
    llm = LLM(tiny_llava, cache=CacheConfig(method="h2o", budget=0.5))
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=3)
    assert [o.token_ids for o in llm.generate(requests(images), params)] == [
        o.token_ids for o in llm.generate(requests(images), params)
    ]


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"image": None, "prompt": "what"}, "'image' must be a PIL image"),
        ({"image": "x.png", "prompt": "what"}, "'image' must be a PIL image"),
        ({"prompt": "what"}, "'image' must be a PIL image"),
        ({"image": "IMG", "prompt": "   "}, "'prompt' must be a non-empty string"),
        ({"image": "IMG", "prompt": 3}, "'prompt' must be a non-empty string"),
    ],
)
def test_a_bad_request_fails_alone_with_a_clear_error(bad, message, tiny_llava, images):
    if bad.get("image") == "IMG":
        bad = {**bad, "image": images[0]}
    good = requests(images)[0]
    llm = LLM(tiny_llava)
    outs = llm.generate([good, bad, good], SamplingParams(max_tokens=4, ignore_eos=True))
    assert [o.finish_reason for o in outs] == ["length", "error", "length"]
    assert outs[1].error.startswith("request 1: ") and message in outs[1].error
    assert outs[1].text is None and outs[1].token_ids == [] and outs[0].error is None
    assert outs[0].token_ids == outs[2].token_ids
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request(bad)  # the streaming interface raises at once


def test_compact_positions_are_refused_for_qwen2_vl(tiny_qwen):
    with pytest.raises(ValueError, match="positions='compact' is not possible for qwen2_vl"):
        LLM(tiny_qwen, cache=CacheConfig(method="elastic", budget=0.5, positions="compact"))


def test_a_temperature_or_top_p_below_the_greedy_bound_samples_greedily(tiny_llava, images):
    llm = LLM(tiny_llava)
    greedy = [o.token_ids for o in llm.generate(requests(images), SamplingParams(max_tokens=6, ignore_eos=True))]
    # each of these once made the sampler's probabilities inf or NaN and the step raise
    for degenerate in ({"temperature": 1e-40}, {"temperature": 5e-324}, {"temperature": GREEDY_BELOW / 2, "seed": 3},
                       {"temperature": 1.0, "top_p": 1e-50}, {"temperature": 2.0, "top_p": 5e-324},
                       {"temperature": 1e-300, "top_p": 1e-300}):
        params = SamplingParams(max_tokens=6, ignore_eos=True, **degenerate)
        assert (params.temperature, params.top_p) == (0.0, 1.0)
        assert [o.token_ids for o in llm.generate(requests(images), params)] == greedy, degenerate
    at_bound = SamplingParams(max_tokens=6, ignore_eos=True, temperature=GREEDY_BELOW, top_p=GREEDY_BELOW, seed=1)
    assert (at_bound.temperature, at_bound.top_p) == (GREEDY_BELOW, GREEDY_BELOW)  # sampled, and finite
    assert all(o.finish_reason == "length" for o in llm.generate(requests(images), at_bound))


@pytest.mark.parametrize("field, value", [
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -1), ("temperature", -1e-9),
    ("temperature", "1"), ("top_p", 0), ("top_p", math.nan), ("top_p", 1.5), ("seed", 2**63), ("seed", -(2**63) - 1),
    ("seed", 1.5), ("seed", True), ("max_tokens", 0), ("max_tokens", -3), ("stop", [""]),
])
def test_sampling_values_that_cannot_run_are_refused_naming_the_field(field, value):
    with pytest.raises(SamplingError, match=f"^{field} ") as error:
        SamplingParams(**{field: value})
    assert error.value.field == field
