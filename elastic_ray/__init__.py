"""elastic-ray: vision-language models on a compressed (Elastic Cache) KV cache, at scale on Ray."""

from elastic_ray.lazy import lazy_exports

_EXPORTS = {"LLM": "elastic_ray.llm", "CacheConfig": "elastic_ray.config", "EngineConfig": "elastic_ray.config",
            "RequestOutput": "elastic_ray.outputs", "SamplingParams": "elastic_ray.config"}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
