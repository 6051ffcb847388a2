"""The budget arithmetic shared by every method (spec §10), in exact integer terms."""

import math

EPS = 1e-6


def prompt_kept(prompt_len: int, budget: float, reserved: int) -> int:
    """Entries kept after the prompt stage: `C0 = max(reserved, T - floor(T(1-b) + eps))`."""
    if prompt_len <= reserved:
        return prompt_len
    removed = math.floor(prompt_len * (1.0 - budget) + EPS)
    return max(reserved, prompt_len - removed)


def over_budget(cache_len: int, seen: int, budget: float) -> bool:
    """Generation-stage rule: evict one entry iff `cache_len >= budget * n + 1 - eps`."""
    return cache_len >= budget * seen + 1.0 - EPS


def peak_entries(prompt_len: int, max_new_tokens: int, budget: float, reserved: int, evicts: bool = True) -> int:
    """Most entries a sequence ever stores, counting the entry appended before an eviction.

    This is the slot size. It follows the rule step by step, so it stays exact where the
    reserved entries keep the cache above `budget * n` for a while.
    """
    if not evicts:
        return prompt_len + max_new_tokens
    cache_len = prompt_kept(prompt_len, budget, reserved)
    peak = cache_len
    for seen in range(prompt_len + 1, prompt_len + max_new_tokens + 1):
        cache_len += 1
        peak = max(peak, cache_len)
        if over_budget(cache_len, seen, budget):
            cache_len -= 1
    return peak
