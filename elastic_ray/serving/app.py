"""The replica and the Serve application: the model loaded once, its engine loop, the routes.

A replica runs an `EngineLoop`: one thread that owns the replica's engines (one per cache method
and budget asked for) and steps them while requests are pending, so concurrent requests share
decode steps. A request's own work (reading its bounded body, parsing, checking, fetching or
decoding its image, tokenising) runs on a worker thread of its own (`RequestPreparer`), and the
loop receives it prepared; request coroutines read their outputs from asyncio queues. Serve
bounds the work: a replica takes `max_ongoing_requests`, the proxy queues `max_queued_requests`
more and answers the rest 429 with Retry-After.
"""

import asyncio
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.config import BackpressureConfig
from starlette.exceptions import HTTPException

from elastic_ray.config import CacheConfig, EngineConfig
from elastic_ray.engine.engine import Engine
from elastic_ray.engine.loop import EngineLoop, Submission
from elastic_ray.models.loading import load
from elastic_ray.outputs import RequestOutput
from elastic_ray.serving.api import APIError, RequestPreparer
from elastic_ray.serving.body import BodyTooLarge, read_body
from elastic_ray.serving.settings import ServeConfig


def resident_bytes() -> int | None:
    """This process's resident memory (Linux), else None."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# --- Answers --------------------------------------------------------------------------------


def settled_text(text: str, stop: tuple[str, ...]) -> str:
    """What later tokens cannot change in a running request's text: no trailing incomplete
    character, no possible start of a stop string, no trailing whitespace (the final text is stripped)."""
    text = text.rstrip("\ufffd")
    if stop:
        text = text[: max(0, len(text) - max(map(len, stop)) + 1)]
    return text.rstrip()


def usage(output: RequestOutput) -> dict:
    prompt, completion = output.stats["prompt_tokens"], output.stats["output_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def kv_cache(output: RequestOutput) -> dict:
    """This server's extension: the request's cache policy and what its cache held at the end."""
    return {key: output.stats[key] for key in ("method", "budget", "kv_bytes", "kv_bytes_full")}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


api = FastAPI(title="elastic-ray")


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None).response()


@api.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()


@serve.deployment(max_constructor_retry_count=3)
@serve.ingress(api)
class ChatServer:
    """One replica: the model, its engine loop, and the OpenAI routes."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.model, self.processor = load(config.model, device="cuda" if config.num_gpus > 0 else None)
        self.engine_config = EngineConfig(
            kv_cache_memory=config.kv_cache_memory, max_num_seqs=config.max_num_seqs, max_tokens=config.max_tokens)
        self.created = int(time.time())
        self.engines = EngineLoop(self._make_engine, config.max_engines,
                                  CacheConfig(config.method, config.budget, **config.cache_options))
        max_prompt_tokens = next(iter(self.engines.engines.values())).max_prompt_tokens  # the same for every engine
        self.prepare = RequestPreparer(config, self.processor, max_prompt_tokens)
        # every request the replica takes prepares at once: a slow image host holds its own requests' threads only
        self.workers = ThreadPoolExecutor(config.ongoing_requests, thread_name_prefix="request")

    def _make_engine(self, cache: CacheConfig) -> Engine:
        return Engine(self.model, self.processor, cache.policy, self.engine_config)

    def check_health(self) -> None:
        """Serve's health check: a stopped engine loop fails it, so Serve replaces the replica."""
        if self.engines.error is not None:
            raise RuntimeError(f"engine loop failed: {self.engines.error!r}")

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        device = next(self.model.parameters()).device
        cpu = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
        body = {"status": "ok" if self.engines.error is None else "failed", "model": self.config.name,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
                "rss_bytes": resident_bytes(), "engines": self.engines.describe()}
        return JSONResponse(body, status_code=200 if self.engines.error is None else 503)

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list",
                "data": [{"id": self.config.name, "object": "model", "created": self.created, "owned_by": "elastic-ray"}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            body = await read_body(request, self.config.max_body_bytes)
            chat, work = await loop.run_in_executor(self.workers, self.prepare, body)
        except BodyTooLarge as e:
            return APIError(413, str(e), code="request_too_large").response()
        except APIError as e:
            return e.response()
        cache_param = "cache_options" if chat.cache_options else "method"

        def deliver(event):
            event = APIError.from_loop(event, cache_param) if isinstance(event, Exception) else event
            loop.call_soon_threadsafe(events.put_nowait, event)

        submission = Submission(work, deliver, stream=chat.stream)
        self.engines.submit(submission)
        try:
            first = await events.get()
        except asyncio.CancelledError:  # the client went away: Serve cancels its request
            self.engines.cancel(submission)
            raise
        if isinstance(first, APIError):
            return first.response()
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.config.name}
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            chunks = self._chunks(head, first, events, work.sampling.stop, include_usage, submission)
            return StreamingResponse(chunks, media_type="text/event-stream")
        return {**head, "object": "chat.completion",  # not streaming: the first output is the finished one
                "choices": [{"index": 0, "message": {"role": "assistant", "content": first.text},
                             "finish_reason": first.finish_reason, "logprobs": None}],
                "usage": usage(first), "kv_cache": kv_cache(first)}

    async def _chunks(self, head: dict, output, events: asyncio.Queue, stop: tuple[str, ...], include_usage: bool,
                      submission: Submission):
        """Server-sent chunks: the role, then text deltas; the last choice chunk carries
        finish_reason and usage (with include_usage, a final chunk without choices carries it, as OpenAI's does).
        A stream closed before its end (the client went away) withdraws its request from the engine."""

        def chunk(delta: dict, finish_reason=None, **extra) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return sse({**head, "object": "chat.completion.chunk", "choices": [choice], **extra})

        ended = False
        try:
            yield chunk({"role": "assistant", "content": ""})
            sent = ""
            while True:
                if isinstance(output, APIError):
                    ended = True
                    yield sse(output.body)
                    break
                text = output.text if output.finished else settled_text(output.text, stop)
                if output.finished:
                    ended = True
                    final = {"usage": usage(output), "kv_cache": kv_cache(output)}
                    yield chunk({"content": text[len(sent):]}, output.finish_reason, **({} if include_usage else final))
                    if include_usage:
                        yield sse({**head, "object": "chat.completion.chunk", "choices": [], **final})
                    break
                if len(text) > len(sent) and text.startswith(sent):
                    yield chunk({"content": text[len(sent):]})
                    sent = text
                output = await events.get()
            yield sse("[DONE]")
        finally:
            if not ended:
                self.engines.cancel(submission)


# glibc raises its mmap threshold to the size of each large block freed, so after one big body every
# later one (up to 32 MiB) is carved from a thread's arena and kept there: a replica's memory would
# ratchet up with each worker thread that parses a large request. A fixed threshold keeps blocks of
# 4 MiB and more (bodies, their JSON strings) in mmap, returned to the system when freed.
REPLICA_ENV = {"MALLOC_MMAP_THRESHOLD_": str(4 << 20)}


def build_app(config: ServeConfig) -> serve.Application:
    """The Serve application; `serve run elastic_ray.serving:build_app key=value ...` validates its
    arguments into a ServeConfig."""
    options = {
        "max_ongoing_requests": config.ongoing_requests,
        "max_queued_requests": config.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=config.retry_after_s),
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus,
                              "runtime_env": {"env_vars": REPLICA_ENV}},
    }
    if config.max_replicas is None:
        options["num_replicas"] = config.num_replicas
    else:
        options["autoscaling_config"] = {"min_replicas": config.num_replicas, "max_replicas": config.max_replicas,
                                         "target_ongoing_requests": config.max_num_seqs}
    return ChatServer.options(**options).bind(config)
