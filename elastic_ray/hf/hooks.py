"""Forward hooks that drive a `PolicyCache` inside transformers' own forward.

- On the decoder stack (pre-hook): start the prompt or the step, swap the 2-D mask for one over
  the stored entries, and rotate the new token at its compact position if asked.
- On every attention module (post-hook): score the prompt and compress it right after the
  layer's own prompt attention; during decoding, accumulate scores and evict.

The hooks do nothing for any other cache, so they stay installed for the model's lifetime.
"""

import torch
from torch import nn

from elastic_ray.hf.cache import CompressedCache, passed_cache
from elastic_ray.kv.importance import attention_received, reduce_heads
from elastic_ray.models.family import Family, attention_queries


def _decoder_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    cache = passed_cache(kwargs)
    if not isinstance(cache, CompressedCache):
        return None
    embeds = kwargs.get("inputs_embeds")
    batch, length = embeds.shape[:2]
    mask = kwargs.get("attention_mask")
    if not cache.prefilled:
        real = mask[:, -length:].bool() if mask is not None else torch.ones(batch, length, dtype=torch.bool)
        cache.begin_prompt(real.to(embeds.device))
        return None
    if length != 1:
        raise RuntimeError("after the prompt stage a compressed cache takes one token per forward")
    kwargs["attention_mask"] = cache.begin_step().to(mask.dtype if mask is not None else torch.long)
    if cache.policy.positions == "compact":
        kwargs["position_ids"] = cache.lengths[:, None].clone()
    return args, kwargs


def _attention_post_hook(cache_layers: int):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output):
        cache = passed_cache(kwargs)
        if not isinstance(cache, CompressedCache):
            return None
        layer = cache.layers[module.layer_idx]
        policy = cache.layer_policies[module.layer_idx]
        if not layer.compressed:
            scores = None
            if policy.prompt_scores is not None:
                raw = policy.prompt_importance(_queries(module, kwargs), layer.keys, module.scaling, cache.real,
                                               cache.image)
                scores = _pack(raw, cache.order)
            selection = policy.select_prompt(
                scores, cache.seen, image=None if cache.image is None else _pack(cache.image, cache.order),
                keys=_pack(layer.keys, cache.order) if policy.prompt_keys else None,
            )
            layer.compress_prompt(selection, cache.order, scores if policy.prompt_scores == "kv" else None, policy)
            if module.layer_idx == cache_layers - 1:
                cache.record_lengths()
            return None
        layer.record_new_positions(cache.seen)
        scores = None
        if policy.decode_scores:
            received = attention_received(_queries(module, kwargs), layer.keys, module.scaling, layer.valid())
            layer.scores += reduce_heads(received, "kv", layer.keys.shape[1])
            scores = layer.logical(layer.scores)
        victims = policy.victims(layer.logical(layer.positions), layer.lengths, layer.truncation, cache.seen, scores)
        layer.evict(policy.over_budget(layer.lengths, cache.seen), victims)
        if module.layer_idx == cache_layers - 1:
            cache.record_lengths()
        return None

    return hook


def _attention_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    """With a per-layer split, a decode step masks this layer by its own entries: the decoder's one
    mask is the first layer's, and layers hold different counts."""
    cache = passed_cache(kwargs)
    if not isinstance(cache, CompressedCache) or not cache.per_layer_masks:
        return None
    layer = cache.layers[module.layer_idx]
    if not layer.compressed:  # the prompt pass: every layer sees the whole prompt
        return None
    allowed = layer.step_mask()[:, None, None, :]
    if "eager" in module.config._attn_implementation:  # an additive mask
        dtype = kwargs["hidden_states"].dtype
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    kwargs["attention_mask"] = allowed
    return args, kwargs


def _queries(module: nn.Module, kwargs: dict) -> torch.Tensor:
    """This forward's rotated queries, recomputed from the attention module's inputs."""
    return attention_queries(module, kwargs["hidden_states"], kwargs["position_embeddings"])


def _pack(tensor: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Move each row's real columns to the front: dim 1 of [B, S], dim 2 of [B, H, S] or [B, H, S, D];
    `order` [B, S] (`pack_order`)."""
    if tensor.dim() == 2:
        return tensor.gather(1, order)
    index = order[:, None, :, None] if tensor.dim() == 4 else order[:, None, :]
    return tensor.gather(2, index.expand(*tensor.shape[:2], order.shape[1], *tensor.shape[3:]))


def install_hooks(family: Family) -> None:
    """Install the hooks on the model once; later calls do nothing."""
    if getattr(family.decoder, "_elastic_ray_hooked", False):
        return
    family.decoder.register_forward_pre_hook(_decoder_pre_hook, with_kwargs=True)
    post = _attention_post_hook(len(family.attentions))
    for attention in family.attentions:
        attention.register_forward_pre_hook(_attention_pre_hook, with_kwargs=True)
        attention.register_forward_hook(post, with_kwargs=True)
    family.decoder._elastic_ray_hooked = True
