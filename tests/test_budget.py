"""Spec §10: the counts every implementation must agree on."""

import math

import pytest

from elastic_ray.kv.budget import over_budget, peak_entries, prompt_kept


def test_prompt_keeps_t_minus_floor_of_removed_with_epsilon():
    # 10 * (1 - 0.9) is 0.9999999999999998 in floating point: the epsilon makes it remove 1.
    assert prompt_kept(10, 0.9, reserved=2) == 9
    assert prompt_kept(100, 0.5, reserved=2) == 50
    assert prompt_kept(7, 0.5, reserved=2) == 4  # removes floor(3.5) = 3
    assert prompt_kept(600, 0.2, reserved=2) == 120


def test_prompt_never_goes_below_the_reserved_entries_and_short_prompts_stay_whole():
    assert prompt_kept(10, 0.01, reserved=2) == 2
    assert prompt_kept(2, 0.1, reserved=2) == 2
    assert prompt_kept(1, 0.1, reserved=2) == 1


def test_budget_one_keeps_everything():
    assert all(prompt_kept(t, 1.0, reserved=2) == t for t in range(0, 50))


def test_generation_rule_evicts_when_cache_reaches_budget_times_seen_plus_one():
    assert over_budget(cache_len=51, seen=100, budget=0.5)
    assert not over_budget(cache_len=51, seen=101, budget=0.5)  # 51 < 51.5
    assert over_budget(cache_len=10, seen=10, budget=0.9)  # 10 >= 9 + 1 - eps


@pytest.mark.parametrize("budget", [0.1, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("prompt_len", [1, 3, 40, 616])
def test_slot_size_is_at_most_the_spec_bound(prompt_len, budget):
    for new in (1, 7, 64, 300):
        peak = peak_entries(prompt_len, new, budget, reserved=2)
        bound = max(math.ceil(budget * (prompt_len + new)) + 1, prompt_kept(prompt_len, budget, 2) + 1)
        assert peak <= bound
        assert peak >= prompt_kept(prompt_len, budget, 2)


def test_a_cache_that_never_evicts_needs_prompt_plus_new_tokens():
    assert peak_entries(600, 100, 1.0, reserved=0, evicts=False) == 700
