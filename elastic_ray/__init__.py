"""elastic-ray: vision-language models on a compressed (Elastic Cache) KV cache, at scale on Ray.

The public names load on first use (PEP 562), so that importing a torch-free part of the package
(the reports, the shapes data) does not import torch, and the jobs' `--help` stays quick.
"""

import importlib

_HOMES = {"LLM": "elastic_ray.llm", "CacheConfig": "elastic_ray.config", "EngineConfig": "elastic_ray.config",
          "SamplingParams": "elastic_ray.config", "RequestOutput": "elastic_ray.outputs"}

__all__ = ["LLM", "CacheConfig", "EngineConfig", "RequestOutput", "SamplingParams"]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'elastic_ray' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
