"""Elastic Cache (Liu et al., ECCV 2024): importance-driven anchors with merging after the prompt,
fixed-point eviction during generation. Spec: shared/spec/elastic-cache.md §3, §4, §10.

Beyond the paper, three options (off by default, so `elastic` is the published method) and a
preset that turns them on, `elastic-vl`:

- `protect_text`: no non-image prompt token is a candidate; they are all kept, like the sink
  and the protected tail, and nothing merges into them. The prompt still keeps C0 entries, so
  fewer image anchors. A row whose protected entries alone exceed C0 is compressed as without
  the option (so it never outgrows its slot). `protect_prefix=False` leaves the text before the
  first image token (a system prompt, a role tag) out of that protection: it competes with the
  image entries for anchors, and only the instruction after the image is kept whole.
- `importance`: "sum" (paper), "mean" (each column sum divided by the queries that see the
  key) or "instruction" (only the queries after the last image token; see `counted_queries`).
- `assign`: "position" (paper: nearest anchor) or "key": the anchor whose key is most similar
  by cosine, the keys of all KV heads concatenated (one choice per layer, shared by its heads);
  ties go to the earlier anchor.
"""

from dataclasses import dataclass, field

import torch
from torch import Tensor

from elastic_ray.kv.budget import prompt_kept
from elastic_ray.kv.entries import Selection
from elastic_ray.kv.importance import CHUNK_ELEMENTS, IMPORTANCE, prompt_importance
from elastic_ray.kv.policy import MAX_INT_OPTION, CachePolicy

POSITIONS = ("original", "compact")
ASSIGN = ("position", "key")


def compress_prompt(
    keys: Tensor, values: Tensor, scores: Tensor, budget: float, *, sink: int = 1, protect: int = 1,
    image: Tensor | None = None, protect_text: bool = False, protect_prefix: bool = True, assign: str = "position",
) -> tuple[Tensor, Tensor, Tensor]:
    """The prompt stage for one sequence and one layer, exactly as spec §10 states it (with the
    options of this module).

    keys/values: [heads, T, head_dim]; scores: [T]; image: [T] bool (needed by protect_text). Returns
    the compressed keys and values and `kept`, the ascending original positions of the kept
    entries. Nothing removed -> the same tensors.
    """
    length = keys.shape[1]
    kept_len = prompt_kept(length, budget, sink + protect)
    if kept_len == length:
        return keys, values, torch.arange(length, device=keys.device)
    candidates = list(range(sink, length - protect))
    if protect_text:
        # the protected text starts at the first image token without protect_prefix (a row without one: all of it)
        start = 0 if protect_prefix else next((t for t in range(length) if image[t]), 0)
        text = {t for t in candidates if not image[t] and t >= start}
        if sink + protect + len(text) <= kept_len:
            candidates = [t for t in candidates if t not in text]
    protected = [t for t in range(length) if t not in candidates]
    by_score = sorted(candidates, key=lambda t: (-float(scores[t]), t))
    anchors = sorted(by_score[: kept_len - len(protected)])
    keys, values = keys.clone(), values.clone()
    if anchors:
        flat = torch.nn.functional.normalize(keys.transpose(0, 1).reshape(length, -1).double(), dim=-1)
        members = {a: [a] for a in anchors}
        for t in candidates:
            if t in members:
                continue
            if assign == "position":
                members[min(anchors, key=lambda a: (abs(t - a), a))].append(t)
            else:
                members[max(anchors, key=lambda a: (float(flat[t] @ flat[a]), -a))].append(t)
        for anchor, group in members.items():
            keys[:, anchor] = keys[:, group].float().sum(1).div(len(group)).to(keys.dtype)
            values[:, anchor] = values[:, group].float().sum(1).div(len(group)).to(values.dtype)
    kept = torch.tensor(sorted(protected + anchors), device=keys.device)
    return keys[:, kept], values[:, kept], kept


@dataclass(frozen=True)
class ElasticCache(CachePolicy):
    sink: int = 1
    protect: int = 1
    offset: int = field(default=25, metadata={"min": 1})
    merge: bool = True
    positions: str = field(default="original", metadata={"choices": POSITIONS})
    protect_text: bool = False
    protect_prefix: bool = True
    importance: str = field(default="sum", metadata={"choices": IMPORTANCE})
    assign: str = field(default="position", metadata={"choices": ASSIGN})

    name = "elastic"
    prompt_scores = "mean"
    positions_modes = POSITIONS

    @property
    def reserved(self) -> int:
        return self.sink + self.protect

    @property
    def prompt_keys(self) -> bool:
        return self.merge and self.assign == "key"

    def truncation_points(self, kept: Tensor) -> Tensor:
        return (kept - self.offset).clamp(min=self.sink)

    def prompt_importance(self, queries: Tensor, keys: Tensor, scaling: float, real: Tensor,
                          image: Tensor | None) -> Tensor:
        return prompt_importance(queries, keys, scaling, real, image, self.importance, self.prompt_scores)

    def select_prompt(self, scores: Tensor | None, lengths: Tensor, *, image: Tensor | None = None,
                      keys: Tensor | None = None) -> Selection:
        """Vectorised §3, with this module's options, over a batch; scores [B, T] (mean over query
        heads), image [B, T] and keys [B, H, T, D] at packed positions."""
        batch, width = scores.shape
        pos = torch.arange(width, device=scores.device)[None, :].expand(batch, width)
        ends = lengths[:, None]
        real = pos < ends
        candidate = (pos >= self.sink) & (pos < ends - self.protect)
        kept = self.kept_counts(lengths)
        if self.protect_text:
            if image is None:
                raise ValueError("protect_text needs the prompt's image-token mask")
            text = candidate & ~image
            if not self.protect_prefix:  # only the text from the first image token on (no image: all of it)
                text &= pos >= torch.where(image.any(1), image.int().argmax(1), 0)[:, None]
            fits = (real & ~candidate).sum(1) + text.sum(1) <= kept  # sink, tail and protected text within C0
            candidate &= ~(text & fits[:, None])
        protected = real & ~candidate
        num_anchors = (kept - protected.sum(1)).clamp(min=0)
        # Stable descending sort: equal scores keep the lower position first.
        order = torch.sort(scores.float().masked_fill(~candidate, float("-inf")), dim=1, descending=True, stable=True)
        rank = torch.empty_like(order.indices).scatter_(1, order.indices, pos)
        anchor = candidate & (rank < num_anchors[:, None])
        keep = protected | anchor
        if not self.merge:
            return Selection(keep=keep[:, None, :])
        if self.assign == "key":
            if keys is None:
                raise ValueError("assign='key' needs the prompt's keys")
            targets = _most_similar_anchor(anchor, candidate, keys)
        else:
            targets = _nearest_anchor(anchor, candidate, pos)
        return Selection(keep=keep[:, None, :], targets=targets[:, None, :])


@dataclass(frozen=True)
class ElasticVLCache(ElasticCache):
    """The preset for vision-language prompts: every option of this module on, and the truncation
    point at the sink (`offset` as large as allowed), so decoding evicts the oldest prompt entries
    first. Chosen by measurement on the demo model (README, Evaluation)."""

    offset: int = field(default=MAX_INT_OPTION, metadata={"min": 1})
    protect_text: bool = True
    importance: str = field(default="instruction", metadata={"choices": IMPORTANCE})
    assign: str = field(default="key", metadata={"choices": ASSIGN})

    name = "elastic-vl"


def _nearest_anchor(anchor: Tensor, candidate: Tensor, pos: Tensor) -> Tensor:
    """[B, T] the anchor each candidate joins (nearest by position, ties to the earlier); -1 if none."""
    width = pos.shape[1]
    previous = torch.where(anchor, pos, -1).cummax(dim=1).values
    following = torch.where(anchor, pos, 2 * width).flip(1).cummin(dim=1).values.flip(1)
    has_previous, has_following = previous >= 0, following < 2 * width
    take_previous = has_previous & (~has_following | (pos - previous <= following - pos))
    target = torch.where(take_previous, previous, following)
    joins = candidate & (has_previous | has_following)
    return torch.where(anchor, pos, torch.where(joins, target, -1))


def _most_similar_anchor(anchor: Tensor, candidate: Tensor, keys: Tensor) -> Tensor:
    """[B, T] the anchor each candidate joins (highest key cosine, all KV heads' keys concatenated,
    ties to the earlier); -1 if the row has no anchor. keys: [B, H, T, D] in packed order."""
    batch, heads, width, dim = keys.shape
    flat = torch.nn.functional.normalize(keys.transpose(1, 2).reshape(batch, width, heads * dim).float(), dim=-1)
    outside = torch.zeros(anchor.shape, dtype=torch.float32, device=keys.device).masked_fill_(~anchor, float("-inf"))
    target = torch.empty(batch, width, dtype=torch.long, device=keys.device)
    chunk = max(1, CHUNK_ELEMENTS // max(1, batch * width))
    for start in range(0, width, chunk):
        similarity = torch.matmul(flat[:, start : start + chunk], flat.transpose(1, 2)).add_(outside[:, None, :])
        target[:, start : start + chunk] = similarity.argmax(-1)  # the first of equal maxima: the earlier
    pos = torch.arange(width, device=keys.device)[None, :]
    joins = candidate & anchor.any(1, keepdim=True)
    return torch.where(anchor, pos, torch.where(joins, target, -1))
