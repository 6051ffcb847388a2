"""`LLM`: the public entry point. Images and instructions in, captions and cache statistics out."""

from elastic_ray.config import CacheConfig, EngineConfig, SamplingParams
from elastic_ray.engine.engine import Engine
from elastic_ray.models.loading import load
from elastic_ray.outputs import RequestOutput


class LLM:
    """A VLM with a compressed KV cache, run by the continuous-batching engine.

    `LLM("demo" | path | hub id | (model, processor), cache=CacheConfig(...), engine=EngineConfig(...))`,
    then `generate([{"image": PIL.Image, "prompt": str}, ...], SamplingParams(...))`, or drive
    `llm.engine` with `add_request` / `step` to stream.
    """

    def __init__(self, model, cache: CacheConfig | None = None, *, engine: EngineConfig | None = None,
                 dtype=None, device=None, attn_implementation: str = "sdpa"):
        if isinstance(model, tuple):
            self.model, self.processor = model
        else:
            self.model, self.processor = load(model, dtype=dtype, device=device, attn_implementation=attn_implementation)
        self.cache = cache or CacheConfig()
        self.tokenizer = self.processor.tokenizer
        self.engine = Engine(self.model, self.processor, self.cache.policy, engine)

    def generate(self, requests: list[dict], sampling: SamplingParams | None = None) -> list[RequestOutput]:
        """Outputs in request order, `request_id` = the request's index. A bad request raises
        ValueError naming it, before any work."""
        return self.engine.generate(requests, sampling)
