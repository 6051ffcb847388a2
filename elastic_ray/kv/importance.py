"""How much attention each key received, recomputed in query chunks (no L x H x T x T maps)."""

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 24  # probabilities materialised at once: 64 MiB of float32


def attention_column_sums(
    queries: Tensor, keys: Tensor, scaling: float, key_valid: Tensor, query_valid: Tensor, query_offset: int
) -> Tensor:
    """Column sums of softmax(q·kᵀ) over valid query rows, per query head.

    queries: [B, Hq, Q, D] (after RoPE); keys: [B, Hkv, K, D] with Hq a multiple of Hkv;
    key_valid: [B, K] and query_valid: [B, Q] bool; query i sits at key index query_offset + i
    and sees keys j <= query_offset + i. Returns [B, Hq, K] float32.
    """
    batch, heads, num_queries, _ = queries.shape
    num_keys = keys.shape[2]
    keys_t = keys.repeat_interleave(heads // keys.shape[1], dim=1).float().transpose(-1, -2)
    queries = queries.float() * scaling
    key_index = torch.arange(num_keys, device=keys.device)
    weights = query_valid.float()
    sums = torch.zeros(batch, heads, num_keys, dtype=torch.float32, device=keys.device)
    chunk = max(1, CHUNK_ELEMENTS // max(1, batch * heads * num_keys))
    for start in range(0, num_queries, chunk):
        stop = min(start + chunk, num_queries)
        query_index = torch.arange(start, stop, device=keys.device) + query_offset
        visible = key_valid[:, None, :] & (key_index[None, :] <= query_index[:, None])[None]
        # a padding query sees every key, so no row is all -inf (no NaN); its weight is 0
        visible |= ~query_valid[:, start:stop, None]
        bias = torch.zeros(visible.shape, dtype=torch.float32, device=keys.device).masked_fill_(~visible, float("-inf"))
        probs = torch.matmul(queries[:, :, start:stop], keys_t).add_(bias[:, None]).softmax(-1)
        # [B, H, Q, K] x [B, 1, Q, 1] summed over Q, as one batched product
        sums += torch.matmul(weights[:, None, None, start:stop], probs).squeeze(2)
    return sums


def reduce_heads(sums: Tensor, mode: str, kv_heads: int) -> Tensor:
    """[B, Hq, K] -> [B, K] (mean over query heads) or [B, Hkv, K] (sum over each KV head's group)."""
    if mode == "mean":
        return sums.mean(1)
    batch, heads, num_keys = sums.shape
    return sums.view(batch, kv_heads, heads // kv_heads, num_keys).sum(2)


IMPORTANCE = ("sum", "mean", "instruction")


def counted_queries(real: Tensor, image: Tensor | None, importance: str) -> Tensor:
    """[B, S] bool: the prompt queries whose attention counts towards importance.

    "sum" and "mean": every real query. "instruction": the real queries after the row's last
    image token; a row whose image ends the prompt counts its last query alone, and a row with
    no image token counts every real query (its "last image token" is before the prompt).
    """
    if importance != "instruction":
        return real
    if image is None:
        raise ValueError("importance='instruction' needs the prompt's image-token mask")
    pos = torch.arange(real.shape[1], device=real.device)[None, :]
    last_image = torch.where(image & real, pos, -1).amax(1)
    last_real = torch.where(real, pos, -1).amax(1)
    first = torch.minimum(last_image + 1, last_real)
    return real & (pos >= first[:, None])


def prompt_importance(queries: Tensor, keys: Tensor, scaling: float, real: Tensor, image: Tensor | None,
                      importance: str, heads: str | None) -> Tensor | None:
    """One layer's prompt importance: column sums of attention over the counted queries
    (`counted_queries`), "mean" dividing each by the number of real queries that see its key,
    then reduced over heads by `heads` ("mean" or "kv", see `reduce_heads`; None: no scores).

    queries: [B, Hq, S, D] (after RoPE); keys: [B, Hkv, S, D]; real, image: [B, S] bool, columns
    as the prompt's (pads anywhere). Returns [B, S] or [B, Hkv, S] float32.
    """
    if heads is None:
        return None
    counted = counted_queries(real, image, importance)
    first = int(counted.int().argmax(1).min())  # no query before this column counts: skip them
    sums = attention_column_sums(queries[:, :, first:], keys, scaling, real, counted[:, first:], first)
    if importance == "mean":
        # real queries at or after each key's column: the ones that see it (causal)
        seeing = real.int().flip(1).cumsum(1).flip(1)
        sums = sums / seeing.clamp(min=1)[:, None, :]
    return reduce_heads(sums, heads, keys.shape[1])


def importance_from_probabilities(probs: Tensor, image: Tensor, importance: str) -> Tensor:
    """Reference for one sequence, no padding: probs [Hq, T, T] the causal attention probabilities
    (query rows, key columns), image [T] bool. Returns [T], the mean over query heads."""
    length = probs.shape[-1]
    images = [t for t in range(length) if image[t]]
    first = min(images[-1] + 1, length - 1) if importance == "instruction" and images else 0
    scores = probs[:, first:, :].double().sum(1).mean(0)
    if importance == "mean":
        scores = scores / torch.arange(length, 0, -1, dtype=torch.float64)  # key t is seen by T - t queries
    return scores.float()
