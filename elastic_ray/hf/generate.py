"""transformers' own `generate()` running on a `CompressedCache`."""

import torch
from torch import nn

from elastic_ray.hf.cache import CompressedCache, cache_keyword
from elastic_ray.hf.hooks import install_hooks
from elastic_ray.kv.policy import CachePolicy
from elastic_ray.models.family import Family, family_of


def check_positions(policy: CachePolicy, family: Family) -> None:
    if policy.positions not in family.positions_modes:
        raise ValueError(
            f"positions={policy.positions!r} is not possible for {family.model_type}; "
            f"allowed: {list(family.positions_modes)}"
        )


def generate_compressed(model: nn.Module, inputs: dict, policy: CachePolicy, family: Family | None = None, **kwargs):
    """Run `model.generate(**inputs, **kwargs)` with a fresh compressed cache; returns (output, cache)."""
    family = family or family_of(model)
    check_positions(policy, family)
    cache = CompressedCache(policy, len(family.attentions), image=family.image_mask(inputs["input_ids"]))
    install_hooks(family)
    with torch.no_grad():
        output = model.generate(**inputs, **{cache_keyword(model): cache}, **kwargs)
    return output, cache
