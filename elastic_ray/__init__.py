"""elastic-ray: vision-language models on a compressed (Elastic Cache) KV cache, at scale on Ray."""

from elastic_ray.config import CacheConfig, EngineConfig, SamplingParams
from elastic_ray.llm import LLM
from elastic_ray.outputs import RequestOutput

__all__ = ["LLM", "CacheConfig", "EngineConfig", "RequestOutput", "SamplingParams"]
