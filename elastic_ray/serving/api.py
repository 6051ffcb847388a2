"""What a chat completion request may ask, and how a bad one is answered.

The schema bounds every value (numbers, lengths, counts); `check` turns a parsed request into
the engine's terms, refusing what cannot run with a 4xx naming the field in OpenAI's error
format; `RequestPreparer` does the rest of a request's work (the instruction's length against
the prompt limit, the image decoded or fetched, the processor) on the request's own thread, so
the engine loop receives a prepared request and its step time does not depend on any payload.
"""

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from elastic_ray.config import INT64, CacheConfig, SamplingError, SamplingParams
from elastic_ray.data.fetch import Fetcher
from elastic_ray.data.images import ImageError, ImageSource, data_url_bytes, decode_image
from elastic_ray.engine.loop import LoopStopped, Refused, Work
from elastic_ray.kv import METHODS
from elastic_ray.kv.layers import MAX_LAYERS, names_a_file
from elastic_ray.models.prompts import check_instruction_length, prepare_request
from elastic_ray.serving.settings import ServeConfig

# Integer cache options: no method counts more entries or positions than this (contexts are far
# shorter), and sums of a few such values stay inside the int64 the cache's tensors use.
MAX_OPTION_INT = 2**31 - 1
MAX_OPTIONS, MAX_OPTION_CHARS = 16, 64


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
    def from_loop(cls, error: Exception, cache_param: str = "method") -> "APIError":
        """The answer to an engine loop's error: a refusal is the request's fault (400; a cache
        policy's names `cache_param`), a stopped loop is unavailable (503), a request that could
        not start or a failed engine is the server's fault (500)."""
        if isinstance(error, Refused):
            return cls(400, str(error), cache_param if error.field == "cache" else "messages")
        if isinstance(error, LoopStopped):
            return cls(503, str(error), type="server_error")
        return cls(500, str(error), type="server_error")


# --- The request ------------------------------------------------------------------------------


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
    content: str | Annotated[list[Annotated[TextPart | ImagePart, Field(discriminator="type")]], Field(max_length=16)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The chat completion fields this server honours; `method`, `budget`, `cache_options` and
    `ignore_eos` are its extensions (extra body fields). Unknown fields are ignored; `n` > 1 and
    logprobs are refused; NaN and infinities are refused everywhere."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = Field(max_length=256)
    messages: list[Message] = Field(min_length=1, max_length=16)
    max_tokens: int | None = Field(None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Annotated[str, Field(max_length=256)] | Annotated[list[Annotated[str, Field(max_length=256)]],
                                                            Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
    n: Literal[1] = 1
    logprobs: Literal[False] | None = None
    ignore_eos: bool = False
    method: str | None = Field(None, max_length=64)
    budget: float | None = None
    cache_options: dict[str, Any] | None = Field(None, max_length=MAX_OPTIONS)

    @field_validator("cache_options")
    @classmethod
    def _scalars(cls, options):
        """Option values are booleans, bounded integers, finite numbers or short strings."""
        for key, value in (options or {}).items():
            if len(key) > MAX_OPTION_CHARS:
                raise ValueError(f"option names are at most {MAX_OPTION_CHARS} characters")
            if isinstance(value, bool):
                continue
            if isinstance(value, int) and abs(value) > MAX_OPTION_INT:
                raise ValueError(f"{key} = {value} is outside [-{MAX_OPTION_INT}, {MAX_OPTION_INT}]")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{key} must be finite")
            if isinstance(value, str) and len(value) > MAX_OPTION_CHARS:
                raise ValueError(f"{key} is over {MAX_OPTION_CHARS} characters")
            if key == "layer_budgets" and isinstance(value, list):  # per-layer ratios, checked by the policy
                if len(value) > MAX_LAYERS or not all(_finite_number(v) for v in value):
                    raise ValueError(f"layer_budgets must be a list of at most {MAX_LAYERS} finite numbers")
                continue
            if not isinstance(value, (int, float, str)):
                raise ValueError(f"{key} must be a boolean, a number or a string, got {type(value).__name__}")
        return options


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_request(body: bytes) -> ChatRequest:
    """The validated request; malformed JSON or a bad field raises APIError 400 naming the field."""
    try:
        return ChatRequest.model_validate_json(body)
    except ValidationError as e:
        error = e.errors()[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        message = f"{param}: {error['msg']}" if param else error["msg"]
        raise APIError(400, message, param, code=error["type"]) from None


@dataclass(frozen=True)
class Checked:
    """A request in the engine's terms: its cache policy, sampling, instruction and image URL."""

    cache: CacheConfig
    sampling: SamplingParams
    instruction: str
    image_url: str


def check(chat: ChatRequest, config: ServeConfig) -> Checked:
    """Check a parsed request against the server's limits (fast: nothing decoded or tokenised)."""
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
    if chat.cache_options is not None and names_a_file(chat.cache_options.get("layer_budgets")):
        raise APIError(400, "cache_options: a request gives layer_budgets as ratios; a calibration file is the "
                            "server's own setting (its cache_options)", "cache_options")
    try:
        cache = CacheConfig(method, budget, **options)
    except (ValueError, TypeError, OverflowError) as e:
        raise APIError(400, f"cache_options: {e}", "cache_options") from None
    max_tokens = chat.max_completion_tokens or chat.max_tokens or config.max_tokens
    if max_tokens > config.max_tokens:
        param = "max_completion_tokens" if chat.max_completion_tokens else "max_tokens"
        raise APIError(400, f"{param} {max_tokens} is over this server's limit of {config.max_tokens}", param)
    stop = [chat.stop] if isinstance(chat.stop, str) else chat.stop or []
    try:
        sampling = SamplingParams(max_tokens=max_tokens, temperature=chat.temperature, top_p=chat.top_p, stop=stop,
                                  ignore_eos=chat.ignore_eos, seed=chat.seed)
    except SamplingError as e:
        raise APIError(400, str(e), e.field) from None
    instruction, url = instruction_and_image_url(chat)
    return Checked(cache, sampling, instruction, url)


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


# --- Preparing a request on its own thread ----------------------------------------------------


class RequestPreparer:
    """A replica's request work before the engine: parse and check, refuse an instruction too long
    for the prompt limit before tokenising it, decode a data: URL or fetch an allow-listed http(s)
    URL (one GET within `fetch_timeout_s`, at most `max_concurrent_fetches` at once in the replica,
    at most `max_body_bytes`), decode the image within the pixel limit, run the processor.
    Thread-safe; call it from the request's worker thread."""

    def __init__(self, config: ServeConfig, processor, max_prompt_tokens: int):
        self.config, self.processor, self.max_prompt_tokens = config, processor, max_prompt_tokens
        self.images = ImageSource(config.allow_images_from, max_bytes=config.max_body_bytes,
                                  fetcher=Fetcher(config.fetch_timeout_s, config.max_concurrent_fetches))

    def __call__(self, body: bytes) -> tuple[ChatRequest, Work]:
        chat = parse_request(body)
        checked = check(chat, self.config)
        try:
            check_instruction_length(self.processor, checked.instruction, self.max_prompt_tokens)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        try:
            image = self.load_image(checked.image_url)
        except ImageError as e:
            raise APIError(400, str(e), "messages", code="invalid_image") from None
        try:
            prepared = prepare_request(self.processor, {"image": image, "prompt": checked.instruction},
                                       self.max_prompt_tokens)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        return chat, Work(prepared, checked.sampling, checked.cache)

    def load_image(self, url: str) -> Image.Image:
        """A data: URL, or an http(s) URL under an allowed prefix (redirects are not followed), decoded
        within the pixel limit; anything else raises ImageError."""
        if url.startswith("data:"):
            data = data_url_bytes(url, self.config.max_body_bytes)
        elif url[:8].lower().startswith(("http://", "https://")):
            if not self.config.allow_images_from:
                raise ImageError("http(s) image URLs are refused: this server has no allow-list; send a data: URL")
            data = self.images.read(url)
        else:
            raise ImageError("image_url must be a data: URL or an http(s) URL")
        return decode_image(data, self.config.max_pixels)
