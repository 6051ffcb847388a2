"""KV-cache methods, free of any model, engine or Ray: `make_policy(method, budget, **options)`."""

from dataclasses import fields

from elastic_ray.kv.elastic import ElasticCache, ElasticVLCache, compress_prompt
from elastic_ray.kv.full import FullCache
from elastic_ray.kv.h2o import H2OCache
from elastic_ray.kv.policy import CachePolicy
from elastic_ray.kv.streaming import StreamingCache

METHODS: dict[str, type[CachePolicy]] = {
    cls.name: cls for cls in (FullCache, ElasticCache, ElasticVLCache, H2OCache, StreamingCache)
}


def make_policy(method: str, budget: float = 1.0, **options) -> CachePolicy:
    """Build a method by name; unknown names and options raise ValueError listing what is allowed."""
    if method not in METHODS:
        raise ValueError(f"unknown cache method {method!r}; allowed: {sorted(METHODS)}")
    cls = METHODS[method]
    allowed = sorted(f.name for f in fields(cls) if f.name != "budget")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"method {method!r} has no option(s) {unknown}; allowed: {allowed or 'none'}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be a number in (0, 1], got {budget!r}")
    return cls(budget=float(budget), **options)


__all__ = ["CachePolicy", "ElasticCache", "ElasticVLCache", "FullCache", "H2OCache", "StreamingCache", "METHODS", "compress_prompt", "make_policy"]
