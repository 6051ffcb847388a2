"""elastic-ray: vision-language models on a compressed (Elastic Cache) KV cache, at scale on Ray."""

from elastic_ray.config import CacheConfig, SamplingParams
from elastic_ray.llm import LLM, RequestOutput

__all__ = ["LLM", "CacheConfig", "RequestOutput", "SamplingParams"]
