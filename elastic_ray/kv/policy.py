"""The interface every cache method implements, and the pieces they share."""

from dataclasses import dataclass, fields, replace
from typing import ClassVar

import torch
from torch import Tensor

from elastic_ray.kv.budget import EPS, peak_entries, prompt_kept
from elastic_ray.kv.entries import Selection, real_mask
from elastic_ray.kv.importance import prompt_importance
from elastic_ray.kv.layers import resolve_layer_budgets

# The largest integer option (a count of entries): far beyond any prompt or output a slot holds,
# and small enough that no index arithmetic on it can overflow int64.
MAX_INT_OPTION = 2**20


@dataclass(frozen=True)
class CachePolicy:
    """A KV-cache method: what to keep after the prompt, what to evict after each token.

    Every method shares the budget rule of spec §10; subclasses choose *which* entries.
    Tensors follow one layout: row b's entries packed in [0, lengths[b]). Options are dataclass
    fields; an int option is bounded by `[metadata["min"] (default 0), MAX_INT_OPTION]`, a str
    option by `metadata["choices"]`.

    `layer_budgets` splits the budget over the layers (`kv/layers.py`): layer l then follows
    `for_layer(l)`, the same method with budget b_l, in every count of §10 (prompt stage, eviction,
    slot size). Given as ratios or a calibration file, it is stored as the ratios, or None when the
    split is uniform (then every layer is this policy itself).
    """

    budget: float = 1.0
    layer_budgets: tuple[float, ...] | None = None

    name: ClassVar[str]
    prompt_scores: ClassVar[str | None] = None  # None, "mean" (over query heads) or "kv" (per KV head)
    prompt_keys: ClassVar[bool] = False  # True: `select_prompt` reads the prompt's keys
    decode_scores: ClassVar[bool] = False  # True: accumulate each new query's attention
    positions_modes: ClassVar[tuple[str, ...]] = ("original",)

    def __post_init__(self):
        for option in fields(self):  # options arrive from command lines and JSON bodies
            if option.name == "layer_budgets":
                continue
            value = getattr(self, option.name)
            kind = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,)}[option.type.__name__]
            if not isinstance(value, kind) or (isinstance(value, bool) and option.type is not bool):
                raise ValueError(f"{self.name} option {option.name} must be {option.type.__name__}, got {value!r}")
            low, choices = option.metadata.get("min", 0), option.metadata.get("choices")
            if option.type is int and not low <= value <= MAX_INT_OPTION:
                raise ValueError(f"{self.name} option {option.name} must be in [{low}, {MAX_INT_OPTION}], got {value!r}")
            if choices is not None and value not in choices:
                raise ValueError(f"{self.name} option {option.name} must be one of {choices}, got {value!r}")
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget!r}")
        split = resolve_layer_budgets(self.layer_budgets, self.budget, self.name)
        object.__setattr__(self, "layer_budgets", split)
        # each layer's policy, made once (not a field: equality and hashing see layer_budgets)
        object.__setattr__(self, "_layers", None if split is None else
                           tuple(replace(self, budget=b, layer_budgets=None) for b in split))

    def for_layer(self, layer: int) -> "CachePolicy":
        """The policy layer `layer` follows: this one, or this method at the layer's own budget."""
        return self if self._layers is None else self._layers[layer]

    def layer_policies(self, num_layers: int) -> list["CachePolicy"]:
        """`for_layer` of every layer of a model with `num_layers` layers; ValueError if the split
        has another number of layers."""
        if self._layers is not None and len(self._layers) != num_layers:
            raise ValueError(f"layer_budgets has {len(self._layers)} ratios but the model has {num_layers} layers")
        return [self.for_layer(layer) for layer in range(num_layers)]

    @property
    def positions(self) -> str:
        return "original"

    @property
    def reserved(self) -> int:
        """Entries never compressed away, so the prompt stage keeps at least this many."""
        return 0

    @property
    def evicts(self) -> bool:
        return self.budget < 1.0

    def prompt_kept(self, prompt_len: int) -> int:
        return prompt_kept(prompt_len, self.budget, self.reserved)

    def kept_counts(self, lengths: Tensor) -> Tensor:
        return torch.tensor([self.prompt_kept(int(t)) for t in lengths.tolist()], device=lengths.device)

    def peak_entries(self, prompt_len: int, max_new_tokens: int) -> int:
        """Slot size: the most entries one sequence ever stores."""
        return peak_entries(prompt_len, max_new_tokens, self.budget, self.reserved, self.evicts)

    def over_budget(self, cache_lens: Tensor, seen: Tensor) -> Tensor:
        """[B] bool: rows that evict one entry this step."""
        if not self.evicts:
            return torch.zeros_like(cache_lens, dtype=torch.bool)
        # the same float64 operations, in the same order, as the scalar `over_budget`
        return cache_lens.double() >= self.budget * seen.double() + 1.0 - EPS

    def truncation_points(self, kept: Tensor) -> Tensor:
        """[B] per-row fixed eviction index, for methods that evict at a fixed point."""
        return torch.full_like(kept, -1)

    def prompt_importance(self, queries: Tensor, keys: Tensor, scaling: float, real: Tensor,
                          image: Tensor | None) -> Tensor:
        """The scores `select_prompt` reads, from one layer's prompt pass (columns as the prompt's):
        the column sums of attention over every real query, reduced as `prompt_scores` says."""
        return prompt_importance(queries, keys, scaling, real, image, "sum", self.prompt_scores)

    def select_prompt(self, scores: Tensor | None, lengths: Tensor, *, image: Tensor | None = None,
                      keys: Tensor | None = None) -> Selection:
        """Choose the prompt entries to keep, all inputs in packed order: scores [B, T] ("mean") or
        [B, H, T] ("kv"), image [B, T] bool (the image tokens), keys [B, H, T, D] (if `prompt_keys`)."""
        raise NotImplementedError

    def victims(self, positions: Tensor, lengths: Tensor, truncation: Tensor, seen: Tensor,
                scores: Tensor | None) -> Tensor:
        """[B, H] the column each row evicts if it is over budget (unused on other rows).

        positions [B, H, W]: original token index of the entry in each column; row b's entries fill
        columns [0, lengths[b]) in any order, except that entries before the truncation point never
        move, so the first `truncation[b]` columns hold the row's oldest entries. Here: the oldest
        entry at or after the truncation point, or the newest if the row is shorter than that.
        """
        start = torch.minimum(truncation, lengths - 1)
        columns = torch.arange(positions.shape[-1], device=positions.device)
        region = (columns >= start[:, None]) & (columns < lengths[:, None])
        return positions.masked_fill(~region[:, None, :], torch.iinfo(positions.dtype).max).argmin(-1)


def keep_first_and_last(lengths: Tensor, width: int, first: int, last: Tensor) -> Tensor:
    """[B, 1, width] bool: the first `first` and the last `last[b]` real entries of each row."""
    pos = torch.arange(width, device=lengths.device)[None, :]
    real = real_mask(lengths, width)
    return (real & ((pos < first) | (pos >= (lengths - last)[:, None])))[:, None, :]
