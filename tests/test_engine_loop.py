"""The engine loop without Ray: concurrent submissions share decode steps and get what
LLM.generate gives; the engine pool is bounded; a refusal or a request that fails to start
reaches that request alone, a failing step every request."""

import io
import queue
import threading
import time

import pytest

from PIL import Image

from conftest import INSTRUCTIONS
from elastic_ray import LLM, CacheConfig, EngineConfig, SamplingParams
from elastic_ray.data.shapes import png_bytes
from elastic_ray.engine.engine import Engine
from elastic_ray.engine.loop import (EngineFailed, EngineLoop, LoopStats, LoopStopped, Refused, RequestFailed,
                                     Submission, Work)

ENGINE = EngineConfig(kv_cache_memory=2**24, max_num_seqs=4, max_tokens=8)
ELASTIC, FULL = CacheConfig("elastic", 0.5), CacheConfig("full", 1.0)


def make_loop(model, max_engines=2, first=ELASTIC, made=None):
    def make(cache):
        engine = Engine(*model, cache.policy, ENGINE)
        if made is not None:
            made.append((cache, engine))
        return engine

    return EngineLoop(make, max_engines, first)


def submit_all(loop, prepared: list[Work]) -> list[queue.Queue]:
    """Submit each from its own thread, as request coroutines would."""
    queues = [queue.Queue() for _ in prepared]
    threads = [threading.Thread(target=loop.submit, args=(Submission(p, q.put),)) for p, q in zip(prepared, queues)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return queues


def last_event(q: queue.Queue):
    while True:
        event = q.get(timeout=60)
        if isinstance(event, Exception) or event.finished:
            return event


def requests(images, n):
    return [{"image": images[i % len(images)], "prompt": INSTRUCTIONS[i % len(INSTRUCTIONS)]} for i in range(n)]


def test_concurrent_requests_share_steps_and_match_generate(tiny_llava, images):
    sampling = SamplingParams(max_tokens=8, ignore_eos=True)
    made = []
    loop = make_loop(tiny_llava, made=made)
    try:
        outputs = [last_event(q) for q in submit_all(loop, [Work(r, sampling, ELASTIC) for r in requests(images, 6)])]
    finally:
        loop.close()
    expected = LLM(tiny_llava, cache=ELASTIC, engine=ENGINE).generate(requests(images, 6), sampling)
    assert [o.token_ids for o in outputs] == [e.token_ids for e in expected]
    assert [o.text for o in outputs] == [e.text for e in expected]
    (_, engine), = made
    assert engine.steps["decode"] < 6 * 7 / 2  # one at a time would take 42 decode steps


def test_the_pool_is_bounded_and_a_request_waits_for_an_idle_engine(tiny_llava, images):
    sampling = SamplingParams(max_tokens=8, ignore_eos=True)
    made = []
    loop = make_loop(tiny_llava, max_engines=1, made=made)
    try:
        mixed = [Work(r, sampling, FULL if i % 2 else ELASTIC) for i, r in enumerate(requests(images, 4))]
        outputs = [last_event(q) for q in submit_all(loop, mixed)]
        assert [o.stats["method"] for o in outputs] == ["elastic", "full", "elastic", "full"]
        assert all(o.finish_reason == "length" for o in outputs)
        assert len(loop.engines) == 1 and len(loop.describe()) == 1
    finally:
        loop.close()
    assert len(made) >= 2  # engines were dropped and made again as the policies alternated
    for cache in (ELASTIC, FULL):
        chosen = [i for i in range(4) if mixed[i].cache == cache]
        expected = LLM(tiny_llava, cache=cache, engine=ENGINE).generate([mixed[i].request for i in chosen], sampling)
        assert [outputs[i].token_ids for i in chosen] == [e.token_ids for e in expected]


def test_a_refused_request_gets_a_400_and_the_others_run(tiny_llava, images):
    loop = make_loop(tiny_llava)
    try:
        long = {"image": images[0], "prompt": "describe the image . " * 120}
        prepared = [Work(long, SamplingParams(max_tokens=4), ELASTIC),
                    Work(requests(images, 1)[0], SamplingParams(max_tokens=4, ignore_eos=True), ELASTIC)]
        refused, ran = (last_event(q) for q in submit_all(loop, prepared))
        assert isinstance(refused, Refused) and refused.field == "request" and "over the engine's limit" in str(refused)
        assert ran.finish_reason == "length" and len(ran.token_ids) == 4
        quiet = queue.Queue()  # not streaming: only the finished output is delivered
        loop.submit(Submission(prepared[1], quiet.put, stream=False))
        only = quiet.get(timeout=60)
        assert only.finished and only.token_ids == ran.token_ids and quiet.empty()
        assert loop.error is None
    finally:
        loop.close()


def test_a_request_that_fails_to_start_fails_alone_and_the_loop_goes_on(tiny_llava, images):
    noise = png_bytes(Image.effect_noise((64, 64), 50).convert("RGB"))
    truncated = Image.open(io.BytesIO(noise[: len(noise) // 2]))  # opens; decoding it raises OSError
    sampling = SamplingParams(max_tokens=4, ignore_eos=True)
    loop = make_loop(tiny_llava)
    try:
        work = [Work({"image": truncated, "prompt": "what"}, sampling, ELASTIC),
                *(Work(r, sampling, ELASTIC) for r in requests(images, 2))]
        failed, first, second = (last_event(q) for q in submit_all(loop, work))
        assert isinstance(failed, RequestFailed) and "OSError: image file is truncated" in str(failed)
        expected = LLM(tiny_llava, cache=ELASTIC, engine=ENGINE).generate(requests(images, 2), sampling)
        assert [first.token_ids, second.token_ids] == [e.token_ids for e in expected]
        assert loop.error is None and last_event(submit_all(loop, work[1:2])[0]).token_ids == first.token_ids
    finally:
        loop.close()


def test_a_failing_step_fails_every_pending_request_and_stops_the_loop(tiny_llava, images):
    def device_lost():
        raise RuntimeError("device lost")

    def broken(cache):
        engine = Engine(*tiny_llava, cache.policy, ENGINE)
        engine.step = device_lost
        return engine

    loop = EngineLoop(broken, 1, ELASTIC)
    prepared = [Work(r, SamplingParams(max_tokens=4), ELASTIC) for r in requests(images, 3)]
    events = [last_event(q) for q in submit_all(loop, prepared)]
    # those pending when the step failed learn the engine failed; any submitted after it, that the loop stopped
    assert all(isinstance(e, (EngineFailed, LoopStopped)) for e in events)
    assert any(isinstance(e, EngineFailed) for e in events)
    assert all("device lost" in str(e) for e in events if isinstance(e, EngineFailed))
    with pytest.raises(RuntimeError, match="device lost"):
        raise loop.error
    late = queue.Queue()
    loop.submit(Submission(prepared[0], late.put))
    assert isinstance(late.get(timeout=5), LoopStopped)


def test_work_for_a_new_policy_drains_a_busy_engine_instead_of_starving(tiny_llava, images):
    sampling = SamplingParams(max_tokens=8, ignore_eos=True)
    loop = make_loop(tiny_llava, max_engines=1)
    finished, done = [], threading.Event()
    full, e2 = (Work(r, sampling, cache) for r, cache in zip(requests(images, 3)[1:], (FULL, ELASTIC)))

    def deliver(name):
        def put(event):
            if name == "e1" and len(event.token_ids) == 1:
                # e1 is running: the full-cache request comes next, so the elastic one after it waits
                loop.submit(Submission(full, deliver("full")))
                loop.submit(Submission(e2, deliver("e2")))
            if event.finished:
                finished.append(name)
                if len(finished) == 3:
                    done.set()
        return put

    try:
        loop.submit(Submission(Work(requests(images, 1)[0], sampling, ELASTIC), deliver("e1")))
        assert done.wait(60)
    finally:
        loop.close()
    assert finished == ["e1", "full", "e2"]


def test_cancelled_work_is_withdrawn_whether_it_runs_or_waits(tiny_llava, images):
    long = SamplingParams(max_tokens=200, ignore_eos=True)
    made = []

    def make(cache):
        made.append(Engine(*tiny_llava, cache.policy, EngineConfig(max_num_seqs=4, max_tokens=200)))
        return made[-1]

    loop = EngineLoop(make, 1, ELASTIC)
    try:
        first, events, waiting_events = threading.Event(), queue.Queue(), queue.Queue()

        def deliver(event):
            events.put(event)
            first.set()

        running = Submission(Work(requests(images, 1)[0], long, ELASTIC), deliver)
        loop.submit(running)
        assert first.wait(60)
        # the pool's one engine is busy, so work for another policy waits: withdraw it there
        waiting = Submission(Work(requests(images, 2)[1], long, FULL), waiting_events.put)
        loop.submit(waiting)
        loop.cancel(waiting)
        loop.cancel(running)
        after = queue.Queue()
        loop.submit(Submission(Work(requests(images, 3)[2], SamplingParams(max_tokens=4), ELASTIC), after.put))
        assert last_event(after).finished
    finally:
        loop.close()
    (engine,) = made  # the full-cache engine was never made
    assert engine.aborted == 1 and not engine.has_unfinished() and waiting_events.empty()
    delivered = [events.get_nowait() for _ in range(events.qsize())]
    assert delivered and not any(e.finished for e in delivered) and len(delivered[-1].token_ids) < 200


def test_an_engine_holds_at_most_max_pending_requests_and_the_rest_wait_in_the_loop(tiny_llava, images):
    sampling = SamplingParams(max_tokens=6, ignore_eos=True)
    made = []
    loop = EngineLoop(lambda cache: made.append(Engine(*tiny_llava, cache.policy, ENGINE)) or made[-1], 1, ELASTIC,
                      max_pending=5)
    held, real_step = [], made[0].step

    def step():  # the requests the engine holds (running and queued) at each step
        held.append(len(made[0].scheduler.running) + len(made[0].scheduler.waiting))
        return real_step()

    made[0].step = step
    try:
        queues = submit_all(loop, [Work(r, sampling, ELASTIC) for r in requests(images, 12)])
        outputs = [last_event(q) for q in queues]
    finally:
        loop.close()
    assert max(held) == 5 and all(o.finish_reason == "length" for o in outputs)
    expected = LLM(tiny_llava, cache=ELASTIC, engine=ENGINE).generate(requests(images, 12), sampling)
    assert sorted(o.token_ids for o in outputs) == sorted(e.token_ids for e in expected)


def test_the_loop_measures_occupancy_and_its_wait_for_work(tiny_llava, images):
    sampling = SamplingParams(max_tokens=6, ignore_eos=True)
    loop = make_loop(tiny_llava)

    def run(n):  # n requests submitted at once, to their last outputs
        queues = [queue.Queue() for _ in range(n)]
        loop.submit_all([Submission(Work(r, sampling, ELASTIC), q.put) for r, q in zip(requests(images, n), queues)])
        return [last_event(q) for q in queues]

    try:
        time.sleep(0.1)
        assert loop.stats() == LoopStats()  # nothing counted before the first submission, not even waiting
        run(8)
        full = loop.stats()
        time.sleep(0.3)  # idle: counted as waiting once new work ends it
        run(2)
        half = loop.stats()
    finally:
        loop.close()
    # 8 requests on 4 slots: two rounds of 5 decode steps with every slot busy
    assert (full.decode_steps, full.busy_slots, full.slots, full.occupancy) == (10, 40, 40, 1.0)
    assert full.wait_s == 0 and full.step_s > 0
    # then 2 requests on 4 slots: 5 decode steps with half the slots busy
    assert (half.decode_steps - full.decode_steps, half.busy_slots - full.busy_slots) == (5, 10)
    assert half.occupancy == 50 / 60 and half.wait_s - full.wait_s >= 0.3
    assert loop.stats() == half  # the wait after the last work, ended by close, is not counted
