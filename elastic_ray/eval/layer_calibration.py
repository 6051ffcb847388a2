"""Calibrating per-layer budgets (`kv/layers.py`) for a model and a method on a few samples.

For every layer and every ratio b of a grid, how much of the layer survives the method's own
prompt stage at budget b (`select_prompt`, and for "output" its merge too); averaged over the
samples, that is the layer's retention curve, and `solve_split` gives every layer the same
retention at any budget. Two criteria:

- "mass" (PrefixKV's, with each method's own importance): the share of the layer's prompt
  attention mass, as the method scores it (`prompt_importance`: elastic's column sums, elastic-vl's
  instruction-guided ones, H2O's per KV head), that falls on the kept entries (merged ones count as
  lost). A layer whose attention is concentrated reaches high retention with few entries and gives
  budget to one whose attention is spread out.
- "output": 1 - the relative error of the layer's attention output for the prompt's queries after
  its last image token (those that stand in for the answer's), over the compressed entries
  (merged, as the method stores them; each query sees the kept entries up to its own position)
  against the full prompt's; the error measured per query head and averaged.
"""

from dataclasses import replace

import torch

from elastic_ray.eval.samples import Sample
from elastic_ray.kv.entries import apply_selection
from elastic_ray.kv.importance import counted_queries
from elastic_ray.kv.layers import CALIBRATION_VERSION, check_calibration
from elastic_ray.kv.policy import CachePolicy
from elastic_ray.models.family import attention_queries, family_of
from elastic_ray.models.prompts import encode_requests

GRID = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05, 0.10, ..., 1.0
CRITERIA = {"mass": "attention mass kept by the prompt stage",
            "output": "1 - relative error of the attention output after the image"}


def retention_curves(model, processor, policy: CachePolicy, samples: list[Sample],
                     grid: tuple[float, ...] = GRID, criterion: str = "mass") -> list[list[float]]:
    """[layers][len(grid)]: each layer's mean retention under `criterion` ("mass" or "output")."""
    if policy.prompt_scores is None:
        raise ValueError(f"method {policy.name!r} scores no prompt entries: nothing to calibrate")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {sorted(CRITERIA)}, got {criterion!r}")
    family = family_of(model)
    totals = [[0.0] * len(grid) for _ in family.attentions]
    for sample in samples:
        shares_by_layer = _sample_retention(model, processor, family, policy, sample, grid, criterion)
        for layer, shares in enumerate(shares_by_layer):
            totals[layer] = [t + s for t, s in zip(totals[layer], shares)]
    return [[round(t / len(samples), 6) for t in layer] for layer in totals]


@torch.no_grad()
def _sample_retention(model, processor, family, policy: CachePolicy, sample: Sample, grid,
                      criterion: str) -> list[list[float]]:
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
    answer = counted_queries(real, image, "instruction")[0]  # the queries after the image
    for layer, attention in enumerate(family.attentions):
        queries, keys, values = captured[layer], cache.layers[layer].keys, cache.layers[layer].values
        scores = policy.prompt_importance(queries, keys, attention.scaling, real, image)
        mass = scores if scores.dim() == 3 else scores[:, None, :]  # [1, G, T]
        positions = torch.arange(keys.shape[2], device=keys.device)[None, None, :]
        full = _attend(queries[:, :, answer], keys, values, positions, answer.nonzero()[:, 0], attention.scaling)
        shares = []
        for ratio in grid:
            selection = replace(policy, budget=ratio, layer_budgets=None).select_prompt(
                scores, lengths, image=image, keys=keys if policy.prompt_keys else None)
            if criterion == "mass":
                shares.append(float(((mass * selection.keep).sum(-1) / mass.sum(-1).clamp(min=1e-30)).mean()))
                continue
            kept = apply_selection(keys, values, selection)
            output = _attend(queries[:, :, answer], kept.keys, kept.values, kept.positions, answer.nonzero()[:, 0],
                             attention.scaling)
            error = (output - full).norm(dim=-1) / full.norm(dim=-1).clamp(min=1e-30)  # [1, Hq, Q]
            shares.append(max(0.0, 1.0 - float(error.mean())))
        curves.append(shares)
    return curves


def _attend(queries, keys, values, key_positions, query_positions, scaling: float):
    """[1, Hq, Q, D]: each query over the entries at or before its own position (float32).
    keys/values [1, Hkv, C, D]; key_positions [1, Hkv or 1, C], -1 for none."""
    group = queries.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1).float(), values.repeat_interleave(group, 1).float()
    key_positions = key_positions.expand(1, keys.shape[1] // group, -1).repeat_interleave(group, 1)
    visible = (key_positions[:, :, None, :] >= 0) & (key_positions[:, :, None, :] <= query_positions[None, None, :, None])
    logits = torch.matmul(queries.float() * scaling, keys.transpose(-1, -2)).masked_fill(~visible, float("-inf"))
    return torch.matmul(logits.softmax(-1), values)


def calibration_record(model_name: str, policy: CachePolicy, options: dict, samples: list[Sample],
                       curves: list[list[float]], grid: tuple[float, ...] = GRID, criterion: str = "mass",
                       **provenance) -> dict:
    """The JSON record `kv.layers.load_calibration` reads (checked before it is returned)."""
    record = {"version": CALIBRATION_VERSION, "model": model_name, "method": policy.name, "options": options,
              "layers": len(curves), "samples": len(samples), "criterion": f"{criterion}: {CRITERIA[criterion]}",
              "ratios": list(grid), "retention": curves, **provenance}
    check_calibration(record, "calibration record")
    return record
