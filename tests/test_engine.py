"""The engine: fixed-size slots, continuous batching, and the same greedy output as generate()."""

import re

import pytest

from conftest import INSTRUCTIONS
from elastic_ray import LLM, CacheConfig, EngineConfig, SamplingParams
from elastic_ray.engine.engine import Engine
from elastic_ray.hf.generate import generate_compressed
from elastic_ray.hf.static import StaticBatchGenerator
from elastic_ray.models.family import family_of
from elastic_ray.models.prompts import PreparedRequest, encode_requests, prepare_request

METHODS = [
    ("full", 1.0, {}),
    ("elastic", 0.5, {}),
    ("elastic", 0.3, {"merge": False}),
    ("elastic", 0.5, {"offset": 4}),
    ("elastic", 0.3, {"protect_text": True, "importance": "mean"}),
    ("elastic-vl", 0.5, {}),
    ("elastic-vl", 0.3, {"protect_prefix": False}),
    ("h2o", 0.5, {}),
    ("streaming", 0.5, {}),
]
MAX_TOKENS = [9, 3, 14, 5, 11, 4, 7]  # ragged, so sequences finish mid-flight and slots are reused


def requests(images, n=len(MAX_TOKENS)):
    return [{"image": images[i % len(images)], "prompt": INSTRUCTIONS[(i * 2) % 3]} for i in range(n)]


def run_streaming(engine: Engine, reqs, max_tokens, ignore_eos=True):
    """Add requests one step apart, step to the end; returns final outputs and per-step slot use."""
    pending = list(enumerate(zip(reqs, max_tokens)))
    finished, busy, lengths = {}, [], []
    while pending or engine.has_unfinished():
        if pending:
            i, (request, n) = pending.pop(0)
            engine.add_request(request, SamplingParams(max_tokens=n, ignore_eos=ignore_eos), request_id=i)
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
        busy.append(len(engine.scheduler.running))
        lengths.append(int(engine.runner.slots.lengths.max()))
    return [finished[i] for i in range(len(reqs))], busy, lengths


@pytest.mark.parametrize("method,budget,options", METHODS)
def test_greedy_output_equals_generate_request_by_request_with_joins_into_reused_slots(
    method, budget, options, tiny_vlm, images
):
    cache = CacheConfig(method, budget, **options)
    engine = Engine(*tiny_vlm, cache.policy, EngineConfig(max_num_seqs=3, kv_cache_memory=1 << 26))
    outputs, busy, _ = run_streaming(engine, requests(images), MAX_TOKENS)
    assert max(busy) == 3 and engine.steps["prefill"] > 3  # full, then refilled one by one
    reference = StaticBatchGenerator(*tiny_vlm, cache.policy)
    for request, n, got in zip(requests(images), MAX_TOKENS, outputs):
        want = reference.generate([request], SamplingParams(max_tokens=n, ignore_eos=True))[0]
        assert got.token_ids == want.token_ids
        assert got.stats["kv_entries"] == want.stats["kv_entries"]
        assert got.stats["kv_entries_prompt"] == want.stats["kv_entries_prompt"]


def test_generate_runs_on_the_engine_and_matches_static_batches(tiny_llava, images):
    params = SamplingParams(max_tokens=10)
    cache = CacheConfig("elastic", 0.5)
    engine_out = LLM(tiny_llava, cache, engine=EngineConfig(max_num_seqs=2)).generate(requests(images), params)
    static_out = StaticBatchGenerator(*tiny_llava, cache.policy, max_batch_size=4).generate(requests(images), params)
    assert [o.token_ids for o in engine_out] == [o.token_ids for o in static_out]
    assert [o.text for o in engine_out] == [o.text for o in static_out]


def test_slots_follow_from_the_memory_budget_and_compression_buys_more_of_them(tiny_llava):
    memory = 3_000_000
    config = EngineConfig(kv_cache_memory=memory, max_num_seqs=1000, max_prompt_tokens=120, max_tokens=40)
    engines = {b: Engine(*tiny_llava, CacheConfig("elastic", b).policy, config) for b in (1.0, 0.5, 0.2)}
    for budget, engine in engines.items():
        assert engine.slot_sizes == [engine.policy.peak_entries(120, 40)] * 2
        slot_bytes = engine.slot_sizes[0] * engine.entry_bytes
        assert engine.slot_bytes == slot_bytes
        assert engine.num_slots == memory // slot_bytes
        assert engine.kv_allocated_bytes == engine.num_slots * slot_bytes <= memory
    assert engines[1.0].slot_sizes == [160, 160]
    assert engines[0.2].num_slots >= 4 * engines[1.0].num_slots
    assert engines[0.5].num_slots >= 1.9 * engines[1.0].num_slots
    full = Engine(*tiny_llava, CacheConfig("full").policy, config)
    for engine in engines.values():  # what each engine's budget would hold with the full cache
        assert engine.slots_for(full.policy) == full.num_slots
        assert engine.slots_for(engine.policy) == engine.num_slots


def test_memory_budget_as_a_fraction_of_free_memory(tiny_llava):
    small = Engine(*tiny_llava, CacheConfig().policy, EngineConfig(kv_cache_memory=1e-4, max_num_seqs=10**6))
    large = Engine(*tiny_llava, CacheConfig().policy, EngineConfig(kv_cache_memory=1e-3, max_num_seqs=10**6))
    assert 0 < small.kv_budget_bytes < large.kv_budget_bytes and small.num_slots < large.num_slots


@pytest.mark.slow
@pytest.mark.parametrize("method,budget,options", METHODS)
def test_no_slot_outgrows_its_size_and_peak_kv_stays_within_the_allocation(method, budget, options, tiny_llava, images):
    policy = CacheConfig(method, budget, **options).policy
    engine = Engine(*tiny_llava, policy, EngineConfig(max_num_seqs=2, max_prompt_tokens=60, max_tokens=30))
    outputs, _, lengths = run_streaming(engine, requests(images, 4), [30] * 4)
    assert max(lengths) <= max(engine.slot_sizes)
    assert 0 < engine.peak_kv_bytes <= engine.kv_allocated_bytes
    for out in outputs:
        assert out.stats["kv_bytes"] <= out.stats["slot_bytes"] == engine.slot_bytes
        if budget < 1.0:
            assert out.stats["kv_bytes"] < out.stats["kv_bytes_full"]


def test_streamed_text_grows_by_prefixes_and_ends_with_one_finished_output(tiny_llava, images):
    engine = LLM(tiny_llava).engine
    request_id = engine.add_request(requests(images, 1)[0], SamplingParams(max_tokens=12, ignore_eos=True))
    seen = []
    while engine.has_unfinished():
        seen += [o for o in engine.step() if o.request_id == request_id]
    assert len(seen) == 12 and [o.finished for o in seen] == [False] * 11 + [True]
    for earlier, later in zip(seen, seen[1:]):
        assert later.text.startswith(earlier.text)
        assert later.token_ids[: len(earlier.token_ids)] == earlier.token_ids
    assert seen[-1].finish_reason == "length" and seen[-1].stats["output_tokens"] == 12


def test_requests_the_engine_cannot_hold_are_refused_and_it_keeps_serving(tiny_llava, images):
    llm = LLM(tiny_llava, engine=EngineConfig(max_prompt_tokens=30, max_tokens=8))
    short, long = {"image": images[0], "prompt": "what"}, {"image": images[0], "prompt": INSTRUCTIONS[2] * 3}
    outs = llm.generate([short, long, short], SamplingParams(max_tokens=8, ignore_eos=True))
    assert [o.finish_reason for o in outs] == ["length", "error", "length"]
    assert re.fullmatch(r"request 1: the prompt has \d+ tokens, over the engine's limit of 30 .*", outs[1].error)
    assert len(outs[0].token_ids) == len(outs[2].token_ids) == 8
    (over,) = llm.generate([short], SamplingParams(max_tokens=9))
    assert over.error == "request 0: max_tokens 9 exceeds the engine's limit of 8"
    with pytest.raises(ValueError, match="over the engine's limit of 30"):
        llm.engine.add_request(long, SamplingParams(max_tokens=8))
    assert len(llm.generate([short], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids) == 8


def test_bad_engine_configs_are_refused(tiny_llava):
    with pytest.raises(ValueError, match="holds no slot"):
        Engine(*tiny_llava, CacheConfig().policy, EngineConfig(kv_cache_memory=1000))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        Engine(*tiny_llava, CacheConfig().policy, EngineConfig(max_prompt_tokens=10**6))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        Engine(*tiny_llava, CacheConfig().policy, EngineConfig(max_tokens=4096))
    for bad in (dict(kv_cache_memory=0), dict(kv_cache_memory=1.5), dict(max_num_seqs=0), dict(max_tokens=-1)):
        with pytest.raises(ValueError):
            EngineConfig(**bad)


def test_nucleus_sampling_with_a_tiny_top_p_is_greedy_and_seeds_reproduce(tiny_llava, images):
    llm = LLM(tiny_llava, CacheConfig("h2o", 0.5))
    greedy = llm.generate(requests(images, 3), SamplingParams(max_tokens=10, ignore_eos=True))
    nucleus = llm.generate(requests(images, 3), SamplingParams(max_tokens=10, ignore_eos=True, temperature=1.0, top_p=1e-6))
    assert [o.token_ids for o in nucleus] == [o.token_ids for o in greedy]
    hot = SamplingParams(max_tokens=10, ignore_eos=True, temperature=5.0, seed=7)
    first, again = llm.generate(requests(images, 3), hot), llm.generate(requests(images, 3), hot)
    assert [o.token_ids for o in first] == [o.token_ids for o in again] != [o.token_ids for o in greedy]


def test_a_sequence_finishing_at_eos_frees_its_slot_for_the_next(tiny_llava, images):
    llm = LLM(tiny_llava, engine=EngineConfig(max_num_seqs=1))
    free = llm.generate(requests(images, 1), SamplingParams(max_tokens=12))[0]
    forced, prefills = free.token_ids[2], llm.engine.steps["prefill"]
    llm.model.generation_config.eos_token_id = forced
    try:
        outs = llm.generate(requests(images, 1) * 3, SamplingParams(max_tokens=12))
    finally:
        llm.model.generation_config.eos_token_id = None
    expected = free.token_ids[: free.token_ids.index(forced) + 1]
    assert all(o.finish_reason == "stop" and o.token_ids == expected for o in outs)
    assert llm.engine.steps["prefill"] - prefills == 3 and not llm.engine.has_unfinished()


def test_an_aborted_request_frees_its_slot_and_the_others_run_as_if_it_never_came(tiny_llava, images):
    cache, params = CacheConfig("elastic", 0.5), SamplingParams(max_tokens=10, ignore_eos=True)
    reqs = requests(images, 4)
    engine = Engine(*tiny_llava, cache.policy, EngineConfig(max_num_seqs=2))
    for i, request in enumerate(reqs):
        engine.add_request(request, params, request_id=i)
    finished = {}
    for step in range(4):  # request 1 runs in a slot, request 3 still waits
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    assert [s.request_id for s in engine.scheduler.running] == [0, 1] and not finished
    assert engine.abort(1) and engine.abort(3) and not engine.abort(3) and not engine.abort("unknown")
    assert [s.request_id for s in engine.scheduler.running] == [0] and engine.aborted == 2
    while engine.has_unfinished():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    assert sorted(finished) == [0, 2]
    alone = LLM(tiny_llava, cache, engine=EngineConfig(max_num_seqs=2)).generate([reqs[0], reqs[2]], params)
    assert [finished[0].token_ids, finished[2].token_ids] == [o.token_ids for o in alone]


def test_protect_text_keeps_every_text_token_in_generate_and_in_the_engine_slots(tiny_vlm, images):
    model, processor = tiny_vlm
    # budgets at which some of these prompts' text fits in C0 and some does not (Qwen's images are 4 tokens)
    budget = 0.4 if model.config.model_type == "llava" else 0.8
    policy = CacheConfig("elastic", budget, protect_text=True).policy
    reqs = requests(images, 3)
    inputs = encode_requests(processor, reqs)
    real = inputs["attention_mask"].bool()
    image = family_of(model).image_mask(inputs["input_ids"])
    _, cache = generate_compressed(model, inputs, policy, max_new_tokens=1)
    engine = Engine(model, processor, policy, EngineConfig(max_num_seqs=3))
    for request in reqs:
        engine.add_request(request, SamplingParams(max_tokens=2))
    engine.step()  # the prefill: every prompt compressed into its slot
    fitting = 0
    for row in range(len(reqs)):
        length = int(real[row].sum())
        text = set((~image[row][real[row]]).nonzero().flatten().tolist())  # positions in the prompt
        kept_count = policy.prompt_kept(length)
        fits = len(text | {0, length - 1}) <= kept_count  # text, sink and protected tail within C0
        fitting += fits
        for layer in range(len(cache.layers)):
            positions = cache.layers[layer].positions[row, 0]
            in_cache = set(positions[positions >= 0].tolist())
            slot = engine.runner.slots.positions[layer][row, 0]
            in_slot = set(slot[slot >= 0].tolist())
            assert in_cache == in_slot and len(in_cache) == kept_count
            assert text <= in_cache if fits else not text <= in_cache  # a row over C0: published selection
    assert 0 < fitting < len(reqs)  # both cases occur


def test_a_request_prepared_off_the_engine_runs_as_the_raw_request_does(tiny_llava, images):
    engine = Engine(*tiny_llava, CacheConfig("elastic", 0.5).policy, EngineConfig(max_tokens=8))
    raw = [{"image": image, "prompt": text} for image, text in zip(images, INSTRUCTIONS)]
    prepared = [prepare_request(tiny_llava[1], r, engine.max_prompt_tokens) for r in raw]
    assert all(isinstance(p, PreparedRequest) and p.prompt_tokens > 0 for p in prepared)
    sampling = SamplingParams(max_tokens=6, ignore_eos=True)
    assert [o.token_ids for o in engine.generate(prepared, sampling)] == \
        [o.token_ids for o in engine.generate(raw, sampling)]
    with pytest.raises(ValueError, match="over the engine's limit of 3"):
        prepare_request(tiny_llava[1], raw[0], max_prompt_tokens=3)
