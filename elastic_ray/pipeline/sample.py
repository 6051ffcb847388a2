"""The run's quality sample, measured inside a caption actor: the input's first good rows captioned
through the actor's engine loop with the job's cache and with the full cache (an engine made for
the sample and dropped after it), then scored by the job's `score` function. The actor's model
serves both, so nothing is loaded twice, and the sample runs while the pipeline's first rows are
still being read and prepared."""

import threading
import time

from elastic_ray.config import CacheConfig, SamplingParams
from elastic_ray.engine.engine import Engine
from elastic_ray.engine.loop import EngineLoop, Submission, Work
from elastic_ray.outputs import RequestOutput

FULL = CacheConfig("full", 1.0)


def caption_sample(loop: EngineLoop, engine: Engine, cache: CacheConfig, sampling: SamplingParams,
                   requests: list[dict]) -> tuple[list[str | None], list[str | None]]:
    """Each request's caption with `cache` and with the full cache, both through `loop` (None where
    the engine refused it); the full cache's engine is released at the end."""
    prepared = []
    for request in requests:
        try:
            prepared.append(engine.prepare(request))  # the processor, on this thread
        except ValueError:
            prepared.append(None)
    texts: dict[tuple[CacheConfig, int], str | None] = {}
    done, lock = threading.Event(), threading.Lock()
    work = [(c, i, p) for i, p in enumerate(prepared) if p is not None for c in (cache, FULL)]

    def receiver(key):
        def receive(event: RequestOutput | Exception) -> None:
            ok = isinstance(event, RequestOutput) and event.finish_reason != "error"
            with lock:
                texts[key] = event.text if ok else None
                if len(texts) == len(work):
                    done.set()
        return receive

    if work:
        loop.submit_all([Submission(Work(p, sampling, c), receiver((c, i)), stream=False) for c, i, p in work])
        done.wait()
    loop.release(FULL)
    return ([texts.get((cache, i)) for i in range(len(requests))],
            [texts.get((FULL, i)) for i in range(len(requests))])


def measure_sample(loop: EngineLoop, engine: Engine, cache: CacheConfig, sampling: SamplingParams,
                   requests: list[dict], score) -> dict:
    """`score(captions, references)` over the requests both caches captioned, with the sample's rows and seconds."""
    start = time.perf_counter()
    texts, full = caption_sample(loop, engine, cache, sampling, requests)
    both = [(t, f) for t, f in zip(texts, full) if t is not None and f is not None]
    scores = score([t for t, _ in both], [f for _, f in both]) if both else {"rouge_l": None}
    return {**scores, "rows": len(requests), "captioned": len(both), "wall_s": round(time.perf_counter() - start, 3)}

