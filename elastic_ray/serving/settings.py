"""A deployment's configuration: the model, its default cache policy, engine sizes, the limits on
each request's work, and Serve's limits. Free of Ray and torch (jobs/serve.py parses its flags
into this before either loads)."""

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from elastic_ray.config import CacheConfig, EngineConfig
from elastic_ray.data.fetch import FETCH_TIMEOUT_S, MAX_CONCURRENT_FETCHES
from elastic_ray.data.images import MAX_PIXELS
from elastic_ray.data.urls import URLError, parse_http_url

# A request body holds its image as base64 (4/3 of its bytes) and an instruction: 20 MiB holds a
# 15 MB image, far more than --max-pixels needs in PNG or JPEG.
MAX_BODY_BYTES = 20 * 2**20


class ServeConfig(BaseModel):
    """One deployment: jobs/serve.py's flags and `serve run ... key=value` arguments.

    `max_ongoing_requests` (default 2 x `max_num_seqs`: the running requests and as many waiting
    for a slot) is what a replica takes; beyond it the proxy queues `max_queued_requests` (-1: no
    limit) and answers the rest 429 with `Retry-After: retry_after_s`. With `max_replicas`, Serve
    autoscales from `num_replicas` to `max_replicas`, aiming at `max_num_seqs` ongoing requests a
    replica. A request's body is at most `max_body_bytes` (413); an image URL's fetch takes at most
    `fetch_timeout_s` from start to last byte, and a replica runs at most `max_concurrent_fetches`.
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
    max_body_bytes: int = Field(MAX_BODY_BYTES, ge=1024)
    fetch_timeout_s: float = Field(FETCH_TIMEOUT_S, gt=0)
    max_concurrent_fetches: int = Field(MAX_CONCURRENT_FETCHES, ge=1)
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
            try:
                url = parse_http_url(prefix)
            except URLError as e:
                raise ValueError(f"image URL prefixes must look like http(s)://host/path/, got {prefix!r}: {e}") \
                    from None
            if url.query:
                raise ValueError(f"an image URL prefix may not have a query, got {prefix!r}")
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

    @property
    def ongoing_requests(self) -> int:
        """The requests a replica works on at once."""
        return self.max_ongoing_requests or 2 * self.max_num_seqs
