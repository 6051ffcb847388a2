"""How a demo VLM attends and what its image keys look like: the measures that say whether it
behaves like LLaVA for a compressed cache.

- attention shares: per layer, the share of attention the text queries (the instruction after
  the image and the model's own greedy answer, teacher-forced) give to BOS, to the rest of the
  text before the image (v2: the system prompt), to the image block and to the text after it,
  averaged over heads and queries; plus the largest BOS share of any one head. Real Llama models
  put a large share on BOS in most layers (an attention sink).
- key redundancy: per layer, the mean cosine similarity of the keys of neighbouring image
  tokens (right, and below on the patch grid) against random pairs of image tokens, per head
  and averaged; for the keys as the cache stores them (after RoPE) and before RoPE.
"""

from __future__ import annotations

import random

import torch
from PIL import Image

from elastic_ray.models.prompts import build_prompt



@torch.inference_mode()
def _forward(model, processor, image: Image.Image, instruction: str, max_new_tokens: int, **kwargs):
    """(the prompt's ids with the greedy answer appended, the forward pass over them)."""
    inputs = processor(images=[image], text=[build_prompt(processor, instruction)], return_tensors="pt")
    ids = inputs["input_ids"]
    if max_new_tokens:
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return ids, model(input_ids=ids, pixel_values=inputs["pixel_values"], **kwargs)


def _image_span(model, ids: torch.Tensor) -> tuple[int, int]:
    where = (ids[0] == model.config.image_token_id).nonzero().flatten()
    return int(where[0]), int(where[-1]) + 1


def attention_shares(model, processor, images: list[Image.Image], instructions: list[str],
                     max_new_tokens: int = 48) -> list[dict]:
    """Per layer: {"bos", "before_image", "image", "after_image": mean share, "bos_max_head": the
    largest mean share of one head on BOS}. The model must run eager attention (weights are read)."""
    sums = None
    for image, instruction in zip(images, instructions):
        ids, out = _forward(model, processor, image, instruction, max_new_tokens, output_attentions=True)
        start, end = _image_span(model, ids)
        bounds = {"bos": (0, 1), "before_image": (1, start), "image": (start, end), "after_image": (end, ids.shape[1])}
        per_layer = []
        for weights in out.attentions:  # (1, heads, T, T)
            queries = weights[0, :, end:, :]  # heads, text queries, keys
            shares = {r: queries[..., a:b].sum(-1) for r, (a, b) in bounds.items()}  # heads, queries
            per_layer.append({**{r: s.mean().item() for r, s in shares.items()},
                              "bos_max_head": shares["bos"].mean(-1).max().item()})
        sums = per_layer if sums is None else [{k: a[k] + b[k] for k in a} for a, b in zip(sums, per_layer)]
    return [{k: v / len(images) for k, v in layer.items()} for layer in sums]


def key_redundancy(model, processor, images: list[Image.Image], instruction: str, pairs: int = 2000,
                   seed: int = 0) -> list[dict]:
    """Per layer: mean key cosine of image tokens and their right neighbours, their neighbours
    below (14 positions apart on a 14 x 14 grid) and random pairs of image tokens, after RoPE
    ("cached") and before ("unrotated")."""
    unrotated: dict[int, torch.Tensor] = {}
    layers = model.model.language_model.layers
    hooks = [layer.self_attn.k_proj.register_forward_hook(
        lambda _m, _i, out, i=i: unrotated.__setitem__(i, out)) for i, layer in enumerate(layers)]
    rng = random.Random(seed)
    sums = [dict.fromkeys((f"{kind}_{keys}" for keys in ("cached", "unrotated") for kind in ("right", "below", "random")), 0.0)
            for _ in layers]
    try:
        for image in images:
            ids, out = _forward(model, processor, image, instruction, 0, use_cache=True)
            start, end = _image_span(model, ids)
            side = int((end - start) ** 0.5)
            grid = torch.arange(start, end).reshape(side, side)
            pairs_of = {"right": (grid[:, :-1].flatten(), grid[:, 1:].flatten()),
                        "below": (grid[:-1].flatten(), grid[1:].flatten()),
                        "random": tuple(torch.tensor([rng.sample(range(start, end), 2) for _ in range(pairs)]).T)}
            for i in range(len(layers)):
                cached = out.past_key_values.layers[i].keys[0]  # heads, T, head_dim
                plain = unrotated[i][0].view(cached.shape[1], cached.shape[0], -1).transpose(0, 1)
                for name, keys in (("cached", cached), ("unrotated", plain)):
                    for kind, (a, b) in pairs_of.items():
                        cosine = torch.nn.functional.cosine_similarity(keys[:, a], keys[:, b], dim=-1)
                        sums[i][f"{kind}_{name}"] += cosine.mean().item()
    finally:
        for hook in hooks:
            hook.remove()
    return [{k: v / len(images) for k, v in layer.items()} for layer in sums]
