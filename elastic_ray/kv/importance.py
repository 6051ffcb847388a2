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
    keys = keys.repeat_interleave(heads // keys.shape[1], dim=1).float()
    key_index = torch.arange(num_keys, device=keys.device)
    sums = torch.zeros(batch, heads, num_keys, dtype=torch.float32, device=keys.device)
    chunk = max(1, CHUNK_ELEMENTS // max(1, batch * heads * num_keys))
    for start in range(0, num_queries, chunk):
        stop = min(start + chunk, num_queries)
        logits = queries[:, :, start:stop].float() @ keys.transpose(-1, -2) * scaling
        query_index = torch.arange(start, stop, device=keys.device) + query_offset
        visible = key_valid[:, None, None, :] & (key_index[None, :] <= query_index[:, None])[None, None]
        probs = logits.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)
        sums += (probs * query_valid[:, None, start:stop, None]).sum(2)
    return sums


def reduce_heads(sums: Tensor, mode: str, kv_heads: int) -> Tensor:
    """[B, Hq, K] -> [B, K] (mean over query heads) or [B, Hkv, K] (sum over each KV head's group)."""
    if mode == "mean":
        return sums.mean(1)
    batch, heads, num_keys = sums.shape
    return sums.view(batch, kv_heads, heads // kv_heads, num_keys).sum(2)
