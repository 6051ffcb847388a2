"""Async output: the host reads a step's tokens after the next step is launched, and every request
gets exactly what it gets with synchronous output and from generate(), one step later at most."""

import pytest

from conftest import INSTRUCTIONS
from elastic_ray import CacheConfig, EngineConfig, SamplingParams
from elastic_ray.engine.engine import Engine
from elastic_ray.engine.readback import Copy
from elastic_ray.hf.static import StaticBatchGenerator
from test_engine import METHODS
from test_engine_isolation import broken

ABORTED = 5
PER_LAYER = [("elastic-vl", 0.5, {"layer_budgets": [0.3, 0.7]}), ("h2o", 0.5, {"layer_budgets": [0.7, 0.3]})]


def request(images, i):
    return {"image": images[i % len(images)], "prompt": INSTRUCTIONS[(i * 2) % 3]}


def mixed_workload(model, policy, images):
    """Seven requests ending every way: EOS, a stop string, max_tokens, seeded sampling, teacher
    forcing, an abort mid-run and a single token. EOS and the stop string are taken from the
    reference's own greedy text, so that they do occur. Returns [(request, sampling, forced)] and the EOS id."""
    reference = StaticBatchGenerator(*model, policy)
    free = reference.generate([request(images, 0), request(images, 1)], SamplingParams(max_tokens=12, ignore_eos=True))
    eos = free[0].token_ids[4]
    head = model[1].tokenizer.decode(free[1].token_ids[:6], skip_special_tokens=True).split()
    stop = max(head[1:], key=len)[:3]  # completed by token 6 at the latest
    work = [
        (SamplingParams(max_tokens=12), None),
        (SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,)), None),
        (SamplingParams(max_tokens=7, ignore_eos=True), None),
        (SamplingParams(max_tokens=9, ignore_eos=True, temperature=1.0, seed=3), None),
        (None, free[1].token_ids[:6]),
        (SamplingParams(max_tokens=14, ignore_eos=True), None),
        (SamplingParams(max_tokens=1, ignore_eos=True), None),
    ]
    return [(request(images, i), sampling, forced) for i, (sampling, forced) in enumerate(work)], eos


def drive(engine: Engine, work) -> tuple[dict, dict]:
    """Requests 0-2 at once, 3-4 two steps later, 5-6 two steps after that; request 5 aborted once it
    has run two decode steps. Returns every output of each request, and the final ones."""
    streamed, final, step = {}, {}, 0
    joins = {0: range(0, 3), 2: range(3, 5), 4: range(5, 7)}
    running_since = None
    while step in joins or engine.has_unfinished():
        for i in joins.get(step, ()):
            req, sampling, forced = work[i]
            engine.add_request(req, sampling, request_id=i, forced_tokens=forced)
        if running_since is None and any(s.request_id == ABORTED for s in engine.scheduler.running):
            running_since = engine.steps["decode"]
        if running_since is not None and engine.steps["decode"] == running_since + 2 and not engine.aborted:
            assert engine.abort(ABORTED)
        for output in engine.step():
            streamed.setdefault(output.request_id, []).append(output)
            if output.finished:
                assert output.request_id not in final  # once
                final[output.request_id] = output
        step += 1
    return streamed, final


def summary(output):
    stats = {k: v for k, v in output.stats.items() if k != "logprobs"}
    return output.text, output.token_ids, output.finish_reason, stats


@pytest.mark.parametrize("method,budget,options", METHODS + PER_LAYER)
def test_async_output_equals_synchronous_output_and_generate_request_by_request(
    method, budget, options, tiny_vlm, images, monkeypatch
):
    policy = CacheConfig(method, budget, **options).policy
    work, eos = mixed_workload(tiny_vlm, policy, images)
    reference = StaticBatchGenerator(*tiny_vlm, policy)
    # generate() stops at the model's EOS even when told to ignore it: those requests' references first
    references = {i: reference.generate([work[i][0]], work[i][1])[0] for i in (1, 2, 6)}
    monkeypatch.setattr(tiny_vlm[0].generation_config, "eos_token_id", eos)
    references[0] = reference.generate([work[0][0]], work[0][1])[0]
    runs = {}
    for async_output in (False, True):
        engine = Engine(*tiny_vlm, policy, EngineConfig(max_num_seqs=3, max_tokens=16, async_output=async_output))
        runs[async_output] = drive(engine, work)
        assert not engine.has_unfinished() and engine.runner.busy.sum() == 0 and engine.aborted == 1
    (sync_streamed, sync_final), (async_streamed, async_final) = runs[False], runs[True]

    assert sorted(async_final) == sorted(sync_final) == [i for i in range(len(work)) if i != ABORTED]
    for i in sync_final:
        assert [summary(o) for o in async_streamed[i]] == [summary(o) for o in sync_streamed[i]]
    assert [o.token_ids for o in async_streamed[ABORTED]] == \
        [o.token_ids for o in sync_streamed[ABORTED]][: len(async_streamed[ABORTED])]
    assert [sync_final[i].finish_reason for i in range(3)] == ["stop", "stop", "length"]
    assert sync_final[0].token_ids[-1] == eos and len(sync_final[1].token_ids) < 12  # EOS, the stop string

    for i, want in references.items():
        got = async_final[i]
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
        assert got.stats["kv_entries"] == want.stats["kv_entries"]
    alone = Engine(*tiny_vlm, policy, EngineConfig(max_num_seqs=1, max_tokens=16, async_output=False))
    seeded = alone.generate([work[3][0]], work[3][1])[0]
    assert async_final[3].token_ids == seeded.token_ids
    forced = async_final[4]
    assert forced.token_ids == work[4][2] and len(forced.stats["logprobs"]) == len(work[4][2])
    assert forced.stats["logprobs"] == pytest.approx(sync_final[4].stats["logprobs"], rel=1e-5, abs=1e-6)


def launch_and_read_order(engine: Engine, monkeypatch, steps: int) -> list[tuple[str, int]]:
    """("forward", k) when decode step k is launched, ("read", k) when the host reads its tokens."""
    events, launched_by = [], {}
    forward, sample, read = engine.runner.forward, engine.runner.sample, Copy.read

    def recording_forward(batch):
        events.append(("forward", engine.steps["decode"] + 1))
        return forward(batch)

    def recording_sample(logits, first, seqs):
        copy = sample(logits, first, seqs)
        launched_by[id(copy)] = engine.steps["decode"]
        return copy

    def recording_read(copy):
        events.append(("read", launched_by.get(id(copy), 0)))  # 0: launched before recording
        return read(copy)

    monkeypatch.setattr(engine.runner, "forward", recording_forward)
    monkeypatch.setattr(engine.runner, "sample", recording_sample)
    monkeypatch.setattr(Copy, "read", recording_read)
    for _ in range(steps):
        engine.step()
    return events


@pytest.mark.parametrize("async_output", [False, True], ids=["sync-output", "async-output"])
def test_the_host_reads_a_steps_tokens_only_after_launching_the_next_step(async_output, tiny_llava, images,
                                                                          monkeypatch):
    engine = Engine(*tiny_llava, CacheConfig("elastic", 0.5).policy,
                    EngineConfig(max_num_seqs=3, async_output=async_output))
    for i in range(3):
        engine.add_request(request(images, i), SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()  # the prefill
    events = launch_and_read_order(engine, monkeypatch, steps=6)
    if async_output:  # the prefill's tokens, read after decode step 1 was launched, and so on
        assert events == [("forward", 1), ("read", 0)] + [e for k in range(2, 7) for e in (("forward", k), ("read", k - 1))]
    else:
        assert events == [e for k in range(1, 7) for e in (("forward", k), ("read", k))]


def test_a_request_drawing_its_last_token_leaves_its_slot_before_the_step_that_lags(tiny_llava, images):
    work = {}
    for async_output in (False, True):
        engine = Engine(*tiny_llava, CacheConfig("h2o", 0.5).policy,
                        EngineConfig(max_num_seqs=2, max_tokens=8, async_output=async_output))
        for n in (3, 8, 5):
            engine.add_request(request(images, n), SamplingParams(max_tokens=n, ignore_eos=True))
        engine.add_request(request(images, 0), forced_tokens=list(range(10, 18)))  # all the columns it has
        outputs = []
        while engine.has_unfinished():
            outputs += engine.step()
        assert sorted(len(o.token_ids) for o in outputs if o.finished) == [3, 5, 8, 8]
        work[async_output] = engine.steps, engine.busy_slot_steps
    assert work[True] == work[False]  # no row computed for nothing: they all end at max_tokens


def test_a_failed_prefill_still_owed_is_aborted_and_the_rest_run_on(tiny_llava, images):
    engine = Engine(*tiny_llava, CacheConfig("elastic", 0.5).policy,
                    EngineConfig(max_num_seqs=3, max_tokens=6, async_output=True))
    sampling = SamplingParams(max_tokens=6, ignore_eos=True)
    reqs = [request(images, 1), broken(tiny_llava[1], images, engine.max_prompt_tokens), request(images, 2)]
    for i, r in enumerate(reqs):
        engine.add_request(r, sampling, request_id=i)
    assert engine.step() == []  # the prefill launched; its outputs, the error among them, come next step
    assert len(engine.scheduler.running) == 2 and engine.abort(1) and not engine.abort(1)
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert {o.request_id for o in outputs} == {0, 2} and all(o.finish_reason != "error" for o in outputs)
    expected = Engine(*tiny_llava, CacheConfig("elastic", 0.5).policy, EngineConfig(max_tokens=6, async_output=False))
    assert [o.token_ids for o in outputs if o.finished] == [o.token_ids for o in expected.generate([reqs[0], reqs[2]],
                                                                                                  sampling)]


def test_async_output_is_the_device_default_only_on_cuda(tiny_llava):
    assert not Engine(*tiny_llava, CacheConfig().policy, EngineConfig()).async_output
    assert Engine(*tiny_llava, CacheConfig().policy, EngineConfig(async_output=True)).async_output
    with pytest.raises(ValueError, match="async_output must be True, False or None"):
        EngineConfig(async_output="yes")
