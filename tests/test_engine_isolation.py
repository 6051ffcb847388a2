"""No request can hurt another: degenerate sampling values are clamped to greedy on the device, and
a request that cannot be prepared or prefilled fails alone, on the engine and through its loop."""

import copy
import queue

import pytest
import torch
from PIL import Image

from conftest import INSTRUCTIONS
from elastic_ray import CacheConfig, EngineConfig, SamplingParams
from elastic_ray.engine.engine import Engine
from elastic_ray.engine.loop import EngineLoop, RequestFailed, Submission, Work
from elastic_ray.kv import make_policy
from elastic_ray.models.prompts import PreparedRequest, prepare_request

ELASTIC = CacheConfig("elastic", 0.5)
# temperatures that underflow float32 (to a subnormal or to 0) and top_p that keep nothing but the top token
HOSTILE = [
    dict(temperature=1e-30), dict(temperature=1e-38), dict(temperature=1e-45), dict(temperature=1e-300),
    dict(temperature=5e-324), dict(temperature=1.0, top_p=1e-40), dict(temperature=1.0, top_p=5e-324),
    dict(temperature=100.0, top_p=1e-300), dict(temperature=1e-30, top_p=1e-38), dict(temperature=2e-45, top_p=0.5),
]


def request(images, i):
    return {"image": images[i % len(images)], "prompt": INSTRUCTIONS[i % len(INSTRUCTIONS)]}


def run(engine, reqs, samplings):
    for i, (r, s) in enumerate(zip(reqs, samplings)):
        engine.add_request(r, s, request_id=i)
    done = {}
    while engine.has_unfinished():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    return [done[i] for i in range(len(reqs))]


def test_degenerate_sampling_values_draw_the_greedy_token_and_leave_the_others_alone(tiny_llava, images):
    engine = Engine(*tiny_llava, ELASTIC.policy, EngineConfig(max_num_seqs=16, max_tokens=8))
    reqs = [request(images, i) for i in range(len(HOSTILE) + 1)]
    seeded = SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.5, seed=11)
    samplings = [SamplingParams(max_tokens=8, ignore_eos=True, **h) for h in HOSTILE] + [seeded]
    together = run(engine, reqs, samplings)
    greedy = run(engine, reqs[:-1], [SamplingParams(max_tokens=8, ignore_eos=True)] * len(HOSTILE))
    alone = run(engine, reqs[-1:], [seeded])[0]
    assert all(o.finish_reason == "length" for o in together)
    assert [o.token_ids for o in together[:-1]] == [o.token_ids for o in greedy]
    assert together[-1].token_ids == alone.token_ids != greedy[len(HOSTILE) % 3].token_ids


def test_logits_that_overflow_take_the_greedy_token_without_an_error(tiny_llava, images):
    model, processor = copy.deepcopy(tiny_llava[0]), tiny_llava[1]
    with torch.no_grad():
        model.lm_head.weight.mul_(1e38)  # logits of +-inf, and inf - inf = NaN in the tempered ones
    engine = Engine(model, processor, ELASTIC.policy, EngineConfig(max_num_seqs=4, max_tokens=6))
    reqs = [request(images, i) for i in range(4)]
    hot = [SamplingParams(max_tokens=6, ignore_eos=True, temperature=t, top_p=p) for t, p in
           ((1.0, 1.0), (0.7, 0.9), (1e-30, 1.0), (100.0, 1e-40))]
    outputs = run(engine, reqs, hot)
    greedy = run(engine, reqs, [SamplingParams(max_tokens=6, ignore_eos=True)] * 4)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in greedy]
    assert all(o.finish_reason == "length" and len(o.token_ids) == 6 for o in outputs)


def broken(processor, images, max_prompt_tokens) -> PreparedRequest:
    """A prepared request whose prompt holds one image token more than its image has features."""
    prepared = prepare_request(processor, request(images, 0), max_prompt_tokens)
    ids = prepared.inputs["input_ids"].clone()
    ids[0, -2] = processor.tokenizer.convert_tokens_to_ids("<image>")
    return PreparedRequest({**prepared.inputs, "input_ids": ids}, prepared.prompt_tokens)


@pytest.mark.parametrize("method", ["full", "elastic", "h2o"])
def test_a_request_whose_prefill_fails_fails_alone_and_the_rest_of_its_batch_runs(method, tiny_llava, images):
    policy = make_policy(method, 1.0 if method == "full" else 0.5)
    engine = Engine(*tiny_llava, policy, EngineConfig(max_num_seqs=4, max_tokens=6))
    sampling = SamplingParams(max_tokens=6, ignore_eos=True)
    reqs = [request(images, 1), broken(tiny_llava[1], images, engine.max_prompt_tokens), request(images, 2)]
    outputs = run(engine, reqs, [sampling] * 3)
    assert engine.steps["prefill"] == 1  # one admission: the batch, then each request alone, in one step
    assert [o.finish_reason for o in outputs] == ["length", "error", "length"]
    assert "Image features and image tokens do not match" in outputs[1].error and outputs[1].text is None
    expected = run(engine, [reqs[0], reqs[2]], [sampling] * 2)
    assert [o.token_ids for o in (outputs[0], outputs[2])] == [o.token_ids for o in expected]
    assert not engine.has_unfinished() and engine.runner.busy.sum() == 0


def test_a_request_the_processor_chokes_on_fails_alone_and_leaves_no_trace(tiny_llava, images):
    engine = Engine(*tiny_llava, ELASTIC.policy, EngineConfig(max_tokens=4))
    empty = {"image": Image.new("RGB", (0, 0)), "prompt": "what"}
    with pytest.raises(ZeroDivisionError):
        engine.add_request(empty, SamplingParams(max_tokens=4))
    assert not engine.has_unfinished()
    outputs = engine.generate([request(images, 0), empty], SamplingParams(max_tokens=4, ignore_eos=True))
    assert [o.finish_reason for o in outputs] == ["length", "error"]
    assert outputs[1].error.startswith("request 1: ZeroDivisionError")


def test_through_the_loop_hostile_requests_fail_or_clamp_alone_and_the_loop_goes_on(tiny_llava, images):
    loop = EngineLoop(lambda cache: Engine(*tiny_llava, cache.policy, EngineConfig(max_num_seqs=8, max_tokens=6)),
                      1, ELASTIC)
    try:
        normal = SamplingParams(max_tokens=6, ignore_eos=True)
        bad_prefill = broken(tiny_llava[1], images, loop.engines[ELASTIC].max_prompt_tokens)
        works = [Work(request(images, 0), normal, ELASTIC), Work(bad_prefill, normal, ELASTIC),
                 Work({"image": Image.new("RGB", (0, 0)), "prompt": "what"}, normal, ELASTIC)]
        works += [Work(request(images, i), SamplingParams(max_tokens=6, ignore_eos=True, **h), ELASTIC)
                  for i, h in enumerate(HOSTILE)]
        queues = [queue.Queue() for _ in works]
        for work, q in zip(works, queues):
            loop.submit(Submission(work, q.put, stream=False))
        events = [q.get(timeout=120) for q in queues]
        assert isinstance(events[1], RequestFailed) and "do not match" in str(events[1])
        assert isinstance(events[2], RequestFailed) and "ZeroDivisionError" in str(events[2])
        greedy = Engine(*tiny_llava, ELASTIC.policy, EngineConfig(max_num_seqs=8, max_tokens=6))
        expected = run(greedy, [request(images, i) for i in range(len(HOSTILE))], [normal] * len(HOSTILE))
        assert events[0].token_ids == expected[0].token_ids
        assert [e.token_ids for e in events[3:]] == [o.token_ids for o in expected]
        assert loop.error is None
        after = queue.Queue()
        loop.submit(Submission(Work(request(images, 1), normal, ELASTIC), after.put, stream=False))
        assert after.get(timeout=60).finish_reason == "length"
    finally:
        loop.close()
