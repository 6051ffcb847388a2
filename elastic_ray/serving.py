"""An OpenAI-compatible Ray Serve endpoint on the continuous-batching engine.

    POST /v1/chat/completions   one image and its instruction per request; `stream` for server-sent events
    GET  /v1/models
    GET  /healthz

A replica loads the model once and runs an `EngineLoop`: one thread that owns the replica's
engines (one per cache method and budget asked for) and steps them while requests are pending,
so concurrent requests share decode steps. Request coroutines hand it work and read their
outputs from asyncio queues. Serve bounds the work: a replica takes `max_ongoing_requests`, the
proxy queues `max_queued_requests` more and answers the rest 429 with Retry-After.

    serve run elastic_ray.serving:build_app model=demo method=elastic budget=0.5
    python jobs/serve.py --model demo --method elastic --budget 0.5
"""

import asyncio
import json
import os
import time
import uuid
from typing import Annotated, Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve
from ray.serve.config import BackpressureConfig
from starlette.exceptions import HTTPException

from elastic_ray.config import CacheConfig, EngineConfig, SamplingParams
from elastic_ray.data.images import MAX_PIXELS, ImageError, ImageSource, data_url_bytes, decode_image
from elastic_ray.engine.engine import Engine
from elastic_ray.engine.loop import EngineLoop, LoopStopped, Refused, Submission, Work
from elastic_ray.kv import METHODS
from elastic_ray.models.loading import check_local_model, load
from elastic_ray.outputs import RequestOutput

class ServeConfig(BaseModel):
    """One deployment: the model, its default cache policy, engine sizes and Serve's limits.

    These are jobs/serve.py's flags and `serve run ... key=value` arguments. `max_ongoing_requests`
    (default 2 x `max_num_seqs`: the running requests and as many waiting for a slot) is what a
    replica takes; beyond it the proxy queues `max_queued_requests` (-1: no limit) and answers
    the rest 429 with `Retry-After: retry_after_s`. With `max_replicas`, Serve autoscales from
    `num_replicas` to `max_replicas`, aiming at `max_num_seqs` ongoing requests a replica.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    model: str = "demo"
    served_model_name: str | None = None
    method: str = "elastic-vl"
    budget: float = 0.6
    cache_options: dict[str, Any] = Field(default_factory=dict)  # the default method's options
    max_tokens: int = Field(128, ge=1)
    max_num_seqs: int = Field(16, ge=1)
    kv_cache_memory: int | float = 0.25
    max_engines: int = Field(2, ge=1)
    max_pixels: int = Field(MAX_PIXELS, ge=1)
    allow_images_from: tuple[str, ...] = ()
    num_replicas: int = Field(1, ge=1)
    max_replicas: int | None = Field(None, ge=1)
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_queued_requests: int = Field(64, ge=-1)
    retry_after_s: float = Field(1.0, ge=0)
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)

    @field_validator("allow_images_from", mode="before")
    @classmethod
    def _split(cls, value):
        return tuple(p for p in value.split(",") if p) if isinstance(value, str) else value

    @field_validator("allow_images_from")
    @classmethod
    def _http_prefixes(cls, value):
        for prefix in value:
            if not prefix.startswith(("http://", "https://")) or "/" not in prefix.split("://", 1)[1]:
                raise ValueError(f"image URL prefixes must look like http(s)://host/path/, got {prefix!r}")
        return value

    @field_validator("cache_options", mode="before")
    @classmethod
    def _json(cls, value):
        return json.loads(value) if isinstance(value, str) else value  # `serve run ... cache_options='{...}'`

    @model_validator(mode="after")
    def _check(self):
        CacheConfig(self.method, self.budget, **self.cache_options)
        EngineConfig(kv_cache_memory=self.kv_cache_memory, max_num_seqs=self.max_num_seqs, max_tokens=self.max_tokens)
        if self.max_replicas is not None and self.max_replicas < self.num_replicas:
            raise ValueError(f"max_replicas {self.max_replicas} is below num_replicas {self.num_replicas}")
        return self

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


def check_model(config: ServeConfig) -> None:
    """The model resolves, and a local one leaves room for a prompt after `max_tokens` (ValueError)."""
    check_local_model(config.model, config.max_tokens)


# --- The API's request and errors -----------------------------------------------------------


class APIError(Exception):
    """An answer in OpenAI's error format: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    @property
    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status)

    @classmethod
    def from_loop(cls, error: Exception) -> "APIError":
        """The answer to an engine loop's error: a refusal is the request's fault (400), a
        stopped loop is unavailable (503), a failed engine is the server's fault (500)."""
        if isinstance(error, Refused):
            return cls(400, str(error), "method" if error.field == "cache" else "messages")
        if isinstance(error, LoopStopped):
            return cls(503, str(error), type="server_error")
        return cls(500, str(error), type="server_error")


class ImageURL(BaseModel):
    url: str


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    """A system, developer or user turn (the engine answers single-turn prompts)."""

    role: Literal["system", "developer", "user"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The chat completion fields this server honours; `method`, `budget` and `ignore_eos` are its
    extensions (extra body fields). Unknown fields are ignored; `n` > 1 and logprobs are refused."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: Literal[1] = 1
    logprobs: Literal[False] | None = None
    ignore_eos: bool = False
    method: str | None = None
    budget: float | None = None
    cache_options: dict[str, Any] | None = None


def parse_request(body: bytes) -> ChatRequest:
    """The validated request; malformed JSON or a bad field raises APIError 400 naming the field."""
    try:
        return ChatRequest.model_validate_json(body)
    except ValidationError as e:
        error = e.errors()[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        message = f"{param}: {error['msg']}" if param else error["msg"]
        raise APIError(400, message, param, code=error["type"]) from None


def instruction_and_image_url(chat: ChatRequest) -> tuple[str, str]:
    """The text of every message, in order, and the one image's URL."""
    texts, urls = [], []
    for message in chat.messages:
        parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        for part in parts:
            if isinstance(part, TextPart):
                texts.append(part.text)
            else:
                urls.append(part.image_url.url)
    if not urls:
        raise APIError(400, "missing image: a request needs one image_url part", "messages")
    if len(urls) > 1:
        raise APIError(400, f"one image per request, got {len(urls)}", "messages")
    instruction = "\n".join(t for t in texts if t.strip())
    if not instruction:
        raise APIError(400, "the messages hold no text: send an instruction with the image", "messages")
    return instruction, urls[0]


def load_image(url: str, config: ServeConfig) -> Image.Image:
    """A data: URL, or an http(s) URL under an allowed prefix (redirects are not followed), decoded
    within the pixel limit; anything else raises ImageError."""
    if url.startswith("data:"):
        data = data_url_bytes(url)
    elif url.startswith(("http://", "https://")):
        if not config.allow_images_from:
            raise ImageError("http(s) image URLs are refused: this server has no allow-list; send a data: URL")
        data = ImageSource(config.allow_images_from).read(url)
    else:
        raise ImageError("image_url must be a data: URL or an http(s) URL")
    return decode_image(data, config.max_pixels)


def prepare(chat: ChatRequest, config: ServeConfig) -> Work:
    """Check a parsed request against the server's limits and decode its image (blocking)."""
    if chat.model != config.name:
        raise APIError(404, f"model {chat.model!r} does not exist; this server serves {config.name!r}", "model",
                       code="model_not_found")
    method = chat.method or config.method
    budget = chat.budget if chat.budget is not None else 1.0 if method == "full" else config.budget
    try:
        CacheConfig(method, budget)
    except ValueError as e:
        raise APIError(400, str(e), "method" if method not in METHODS else "budget") from None
    # the server's options belong to its default method; a request may give its own
    options = chat.cache_options if chat.cache_options is not None else \
        config.cache_options if method == config.method else {}
    try:
        cache = CacheConfig(method, budget, **options)
    except (ValueError, TypeError) as e:
        raise APIError(400, f"cache_options: {e}", "cache_options") from None
    max_tokens = chat.max_completion_tokens or chat.max_tokens or config.max_tokens
    if max_tokens > config.max_tokens:
        param = "max_completion_tokens" if chat.max_completion_tokens else "max_tokens"
        raise APIError(400, f"{param} {max_tokens} is over this server's limit of {config.max_tokens}", param)
    stop = [chat.stop] if isinstance(chat.stop, str) else chat.stop or []
    try:
        sampling = SamplingParams(max_tokens=max_tokens, temperature=chat.temperature, top_p=chat.top_p, stop=stop,
                                  ignore_eos=chat.ignore_eos, seed=chat.seed)
    except ValueError as e:
        raise APIError(400, str(e), "stop") from None
    instruction, url = instruction_and_image_url(chat)
    try:
        image = load_image(url, config)
    except ImageError as e:
        raise APIError(400, str(e), "messages", code="invalid_image") from None
    return Work({"image": image, "prompt": instruction}, sampling, cache)


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
                "engines": self.engines.describe()}
        return JSONResponse(body, status_code=200 if self.engines.error is None else 503)

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list",
                "data": [{"id": self.config.name, "object": "model", "created": self.created, "owned_by": "elastic-ray"}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        try:
            chat = parse_request(await request.body())
            work = await asyncio.to_thread(prepare, chat, self.config)
        except APIError as e:
            return e.response()
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def deliver(event):
            event = APIError.from_loop(event) if isinstance(event, Exception) else event
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


def build_app(config: ServeConfig) -> serve.Application:
    """The Serve application; `serve run elastic_ray.serving:build_app key=value ...` validates its
    arguments into a ServeConfig."""
    options = {
        "max_ongoing_requests": config.max_ongoing_requests or 2 * config.max_num_seqs,
        "max_queued_requests": config.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=config.retry_after_s),
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
    }
    if config.max_replicas is None:
        options["num_replicas"] = config.num_replicas
    else:
        options["autoscaling_config"] = {"min_replicas": config.num_replicas, "max_replicas": config.max_replicas,
                                         "target_ongoing_requests": config.max_num_seqs}
    return ChatServer.options(**options).bind(config)
