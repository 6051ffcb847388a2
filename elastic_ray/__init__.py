"""elastic-ray: vision-language models on a compressed (Elastic Cache) KV cache, at scale on Ray."""

import importlib

# Imported on first use, so a command line can parse its arguments before torch loads.
_EXPORTS = {"LLM": "elastic_ray.llm", "CacheConfig": "elastic_ray.config", "EngineConfig": "elastic_ray.config",
            "RequestOutput": "elastic_ray.outputs", "SamplingParams": "elastic_ray.config"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'elastic_ray' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
