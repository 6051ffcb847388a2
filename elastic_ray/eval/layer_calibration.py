"""Calibrating per-layer budgets (`kv/layers.py`) for a model and a method on a few samples.

Criterion (PrefixKV's, with each method's own importance): for every layer and every ratio b of a
grid, the share of the layer's prompt attention mass, as the method scores it (`prompt_importance`:
elastic's column sums, elastic-vl's instruction-guided ones, H2O's per KV head), that falls on the
entries the method's own prompt stage keeps at budget b (`select_prompt`; merged entries count as
lost). Averaged over the samples, that is the layer's retention curve; `solve_split` then gives
every layer the same retention at any budget. A layer whose attention is concentrated reaches
high retention with few entries and gives budget to one whose attention is spread out.
"""

from dataclasses import replace

import torch

from elastic_ray.eval.samples import Sample
from elastic_ray.kv.layers import CALIBRATION_VERSION, check_calibration
from elastic_ray.kv.policy import CachePolicy
from elastic_ray.models.family import attention_queries, family_of
from elastic_ray.models.prompts import encode_requests

GRID = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05, 0.10, ..., 1.0


def retention_curves(model, processor, policy: CachePolicy, samples: list[Sample],
                     grid: tuple[float, ...] = GRID) -> list[list[float]]:
    """[layers][len(grid)]: the mean share of each layer's scored attention mass the method keeps."""
    if policy.prompt_scores is None:
        raise ValueError(f"method {policy.name!r} scores no prompt entries: nothing to calibrate")
    family = family_of(model)
    totals = [[0.0] * len(grid) for _ in family.attentions]
    for sample in samples:
        for layer, shares in enumerate(_sample_retention(model, processor, family, policy, sample, grid)):
            totals[layer] = [t + s for t, s in zip(totals[layer], shares)]
    return [[round(t / len(samples), 6) for t in layer] for layer in totals]


@torch.no_grad()
def _sample_retention(model, processor, family, policy: CachePolicy, sample: Sample, grid) -> list[list[float]]:
    param = next(model.parameters())
    inputs = {k: v.to(param.device, dtype=param.dtype if v.is_floating_point() else None)
              for k, v in encode_requests(processor, [{"image": sample.image, "prompt": sample.instruction}]).items()}
    captured = {}

    def capture(module, args, kwargs):
        captured[module.layer_idx] = attention_queries(module, kwargs["hidden_states"], kwargs["position_embeddings"])

    handles = [a.register_forward_pre_hook(capture, with_kwargs=True) for a in family.attentions]
    try:
        cache = model(**inputs, use_cache=True).cache  # each layer's rotated keys
    finally:
        for handle in handles:
            handle.remove()
    real = inputs["attention_mask"].bool()
    image = family.image_mask(inputs["input_ids"])
    lengths = real.sum(1)
    curves = []
    for layer, attention in enumerate(family.attentions):
        keys = cache.layers[layer].keys
        scores = policy.prompt_importance(captured[layer], keys, attention.scaling, real, image)
        mass = scores if scores.dim() == 3 else scores[:, None, :]  # [1, G, T]
        shares = []
        for ratio in grid:
            keep = replace(policy, budget=ratio, layer_budgets=None).select_prompt(
                scores, lengths, image=image, keys=keys if policy.prompt_keys else None).keep
            shares.append(float(((mass * keep).sum(-1) / mass.sum(-1).clamp(min=1e-30)).mean()))
        curves.append(shares)
    return curves


def calibration_record(model_name: str, policy: CachePolicy, options: dict, samples: list[Sample],
                       curves: list[list[float]], grid: tuple[float, ...] = GRID, **provenance) -> dict:
    """The JSON record `kv.layers.load_calibration` reads (checked before it is returned)."""
    record = {"version": CALIBRATION_VERSION, "model": model_name, "method": policy.name, "options": options,
              "layers": len(curves), "samples": len(samples), "criterion": "attention mass kept by the prompt stage",
              "ratios": list(grid), "retention": curves, **provenance}
    check_calibration(record, "calibration record")
    return record
