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
    and sees keys j <= query_offset + i. Products in the inputs' dtype, softmax and sums in float32:
    returns [B, Hq, K] float32.
    """
    batch, heads, num_queries, _ = queries.shape
    num_keys = keys.shape[2]
    keys_t = keys.repeat_interleave(heads // keys.shape[1], dim=1).transpose(-1, -2)
    queries = queries * scaling
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
        probs = torch.matmul(queries[:, :, start:stop], keys_t).float().add_(bias[:, None]).softmax(-1)
        # [B, H, Q, K] x [B, 1, Q, 1] summed over Q, as one batched product
        sums += torch.matmul(weights[:, None, None, start:stop], probs).squeeze(2)
    return sums


def attention_received(query: Tensor, keys: Tensor, scaling: float, key_valid: Tensor) -> Tensor:
    """What one new query per row pays each stored key: softmax(q·kᵀ) over the valid keys.

    query: [B, Hq, 1, D] (after RoPE); keys: [B, Hkv, K, D]; key_valid: [B, K] bool.
    Returns [B, Hq, K] float32 (no chunks: one query row is small, and the shapes stay static).
    """
    keys_t = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1).float().transpose(-1, -2)
    logits = torch.matmul(query.float() * scaling, keys_t)[:, :, 0]
    return logits.masked_fill(~key_valid[:, None, :], float("-inf")).softmax(-1)


def reduce_heads(sums: Tensor, mode: str, kv_heads: int) -> Tensor:
    """[B, Hq, K] -> [B, K] (mean over query heads) or [B, Hkv, K] (sum over each KV head's group)."""
    if mode == "mean":
        return sums.mean(1)
    batch, heads, num_keys = sums.shape
    return sums.view(batch, kv_heads, heads // kv_heads, num_keys).sum(2)
