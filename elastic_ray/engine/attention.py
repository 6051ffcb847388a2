"""The engine's attention backend: every text-decoder attention of an engine's forward lands here.

`install(family)` registers `attend` through transformers' `AttentionInterface` for the text
decoder only. A forward the runner starts carries a `PrefillBatch` or a `DecodeBatch` under the
`KEYWORD` keyword (transformers hands extra keywords down to the attention function); `attend`
then runs the engine's KV work itself:

- prefill: attention over the prompt rows, their importance from the layer's own query states
  (`policy.prompt_importance`), the selection (`policy.select_prompt`), and the kept entries
  written into the rows' slots;
- decode: the new entry written into its slot (`KVSlots.append`), attention over the slot with a
  per-layer mask from that layer's own lengths, and eviction (`KVSlots.evict`).

Without a batch (anyone else's forward of the same model, e.g. `generate()`), `attend` is the
model's original attention, unchanged.
"""

import sys
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from elastic_ray.engine.slots import KVSlots
from elastic_ray.kv.entries import apply_selection
from elastic_ray.kv.importance import attention_received, reduce_heads
from elastic_ray.kv.policy import CachePolicy
from elastic_ray.models.family import Family

KEYWORD = "elastic_kv"
PREFIX = "elastic_ray_"


@dataclass
class PrefillBatch:
    """A batch of prompts (rows left-padded to S columns) to run and compress into slots [first, first + B)."""

    slots: KVSlots
    policy: CachePolicy
    first: int
    real: Tensor  # [B, S] bool: not padding
    image: Tensor  # [B, S] bool: image tokens
    lengths: Tensor  # [B] real tokens per row
    order: Tensor  # [B, S] each row's real columns first, in order (`pack_order`)
    allowed: Tensor  # [B, 1, S, S] bool: causal over real keys (padding query rows see every key: no NaN)
    padded: bool  # False: every row is real, so sdpa can run plain causal attention without the mask


@dataclass
class DecodeBatch:
    """One decode step over slots [0, n): `active` [n] marks rows that hold a sequence (the others pad
    the batch to its bucket); `width` columns are read, at least every row's length after its write."""

    slots: KVSlots
    policy: CachePolicy
    active: Tensor
    width: int


def attend(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, *,
           original, kernel, **kwargs) -> tuple[Tensor, Tensor | None]:
    """The registered attention function; `original` is the model's own, `kernel` the one the engine
    computes attention with (sdpa, or eager for an eager model)."""
    batch = kwargs.pop(KEYWORD, None)
    if isinstance(batch, DecodeBatch):
        return decode_attention(module, query, key, value, batch, kernel), None
    if isinstance(batch, PrefillBatch):
        return prefill_attention(module, query, key, value, batch, kernel), None
    return original(module, query, key, value, attention_mask, **kwargs)


def prefill_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, batch: PrefillBatch,
                      kernel) -> Tensor:
    """The prompt's attention, then the prompt stage for this layer: score, select, merge, store."""
    unmasked = kernel is sdpa_attention_forward and not batch.padded
    output = _run(kernel, module, query, key, value, None if unmasked else batch.allowed)
    layer = module.layer_idx
    policy = batch.policy.for_layer(layer)
    scores = policy.prompt_importance(query, key, module.scaling, batch.real, batch.image)
    heads = key.shape[1]
    order = batch.order[:, None, :].expand(-1, heads, -1)
    packed_keys, packed_values = _gather(key, order), _gather(value, order)
    packed_scores = None if scores is None else scores.gather(-1, batch.order if scores.dim() == 2 else order)
    selection = policy.select_prompt(packed_scores, batch.lengths, image=batch.image.gather(1, batch.order),
                                     keys=packed_keys if policy.prompt_keys else None)
    kept = apply_selection(packed_keys, packed_values, selection)
    kept_scores = None
    if policy.decode_scores:  # carried along for methods that keep accumulating: [B, Hkv, C]
        kept_scores = packed_scores.gather(2, kept.positions.clamp(min=0)).masked_fill(kept.positions < 0, 0.0)
    batch.slots.store_prompt(layer, batch.first, kept, policy.truncation_points(kept.lengths), kept_scores)
    return output


def decode_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, batch: DecodeBatch,
                     kernel) -> Tensor:
    """One token per row: write it into the slot, attend over the slot's entries, evict."""
    slots, layer = batch.slots, module.layer_idx
    policy = batch.policy.for_layer(layer)
    width = min(batch.width, slots.sizes[layer])
    n = query.shape[0]
    lengths = slots.append(layer, key[:, :, 0], value[:, :, 0], batch.active)
    keys, values = slots.keys[layer][:n, :, :width], slots.values[layer][:n, :, :width]
    allowed = (torch.arange(width, device=query.device)[None, :] < lengths[:, None])[:, None, None, :]
    output = _run(kernel, module, query, keys, values, allowed)
    if policy.decode_scores:  # the attention each stored entry just received, per KV head
        received = attention_received(query, keys, module.scaling, allowed[:, 0, 0])
        received = torch.where(batch.active[:, None, None], received, 0.0)  # padding rows add nothing
        slots.scores[layer][:n, :, :width] += reduce_heads(received, "kv", keys.shape[1])
    if policy.evicts:
        slots.evict(layer, lengths, batch.active, width, policy)
    return output


def _run(kernel, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, allowed: Tensor | None) -> Tensor:
    """[B, Q, Hq, D]: `kernel` with a bool mask (sdpa) or its additive form (eager)."""
    mask = allowed
    if allowed is not None and kernel is not sdpa_attention_forward:
        mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~allowed, torch.finfo(query.dtype).min)
    output, _ = kernel(module, query, key, value, mask, scaling=module.scaling, dropout=0.0)
    return output


def _gather(states: Tensor, index: Tensor) -> Tensor:
    """states [B, H, S, D] at columns index [B, H, S']."""
    return states.gather(2, index.unsqueeze(-1).expand(*index.shape, states.shape[-1]))


def prompt_mask(real: Tensor) -> Tensor:
    """[B, 1, S, S] bool for left-padded prompt rows: causal over real keys; a padding query row sees
    every key, so no row is fully masked (a NaN there would reach real rows through its values)."""
    width = real.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=real.device).tril()
    return ((causal[None] & real[:, None, :]) | ~real[:, :, None])[:, None]


def install(model: nn.Module, family: Family) -> None:
    """Route the text decoder's attention through `attend`; a no-op once done."""
    config = family.decoder.config
    current = config._attn_implementation
    if current.startswith(PREFIX):
        return
    module = sys.modules[type(family.attentions[0]).__module__]
    eager = module.eager_attention_forward
    original = eager if current == "eager" else ALL_ATTENTION_FUNCTIONS[current]
    kernel = eager if current == "eager" else sdpa_attention_forward
    name = f"{PREFIX}{type(family.attentions[0]).__name__}_{current}"
    AttentionInterface.register(name, partial(attend, original=original, kernel=kernel))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    model.set_attn_implementation({"text_config": name})
