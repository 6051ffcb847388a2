"""The engine's KV layout: a new entry takes the column its row last evicted, nothing ever moves,
and after every step a slot holds exactly what spec §10's list rule keeps, for every method."""

import random

import pytest
import torch

from elastic_ray.engine.slots import KVSlots
from elastic_ray.kv import ElasticCache, H2OCache, StreamingCache
from elastic_ray.kv.budget import over_budget
from elastic_ray.kv.entries import apply_selection
from elastic_ray.kv.policy import MAX_INT_OPTION

HEADS, STEPS = 2, 40
POLICIES = [
    ElasticCache(budget=0.5, offset=3),
    ElasticCache(budget=0.3, offset=25),
    ElasticCache(budget=0.2, sink=2, protect=3, offset=2),
    ElasticCache(budget=0.5, offset=MAX_INT_OPTION),  # elastic-vl's decode: evicts from the sink on
    StreamingCache(budget=0.4),
    H2OCache(budget=0.5),
    H2OCache(budget=0.3, recent_ratio=0.2),
]


def score(row: int, head: int, position: int, step: int) -> float:
    """Attention an entry holds at a step: arbitrary, shared by the slots and the list rule (ties included)."""
    return float(random.Random(hash((row, head, position, step))).randint(0, 6))


def list_rule(policy, kept: list[int], prompt_len: int, row: int, head: int) -> list[list[int]]:
    """Spec §10 on a plain list in position order: append, then delete at the truncation point (or
    for H2O the least-scored entry outside the recent window, the oldest on ties)."""
    entries, held = list(kept), []
    truncation = int(policy.truncation_points(torch.tensor([len(kept)]))[0])
    for step in range(1, STEPS + 1):
        seen = prompt_len + step
        entries.append(seen - 1)
        if over_budget(len(entries), seen, policy.budget):
            if isinstance(policy, H2OCache):
                older = entries[: len(entries) - int(policy.recent(torch.tensor(len(entries) - 1)))]
                del entries[min(range(len(older)), key=lambda i: (score(row, head, older[i], step), i))]
            else:
                del entries[min(truncation, len(entries) - 1)]
        held.append(sorted(entries))
    return held


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.name}-{p.budget}")
@pytest.mark.parametrize("seed", range(3))
def test_slots_hold_what_the_list_rule_keeps_at_every_step(policy, seed):
    rng = random.Random(seed)
    prompt_lens = [rng.randint(3, 40) for _ in range(3)]
    lengths = torch.tensor(prompt_lens)
    width = max(prompt_lens)
    scores = torch.rand(len(prompt_lens), HEADS if policy.prompt_scores == "kv" else 1, width)
    selection = policy.select_prompt(scores if policy.prompt_scores == "kv" else scores[:, 0], lengths)
    columns = torch.arange(width, dtype=torch.float32)[None, None, :, None].expand(len(prompt_lens), HEADS, width, 1)
    kept = apply_selection(columns, columns, selection)  # keys carry their own position
    slots = KVSlots(4, [policy.peak_entries(width, STEPS + 1)], HEADS, 1, torch.float32, "cpu", policy.decode_scores)
    slots.store_prompt(0, 0, kept, policy.truncation_points(kept.lengths), None)
    slots.seen[:3] = lengths
    expected = [[list_rule(policy, kept.positions[r, h, : kept.lengths[r]].tolist(), prompt_lens[r], r, h)
                 for h in range(HEADS)] for r in range(3)]
    active = torch.tensor([True, True, True])
    for step in range(1, STEPS + 1):
        slots.seen[:3] += 1
        new = (slots.seen[:3] - 1).float()[:, None, None].expand(3, HEADS, 1)
        free_before = slots.free[0, :3].clone()
        lengths_after = slots.append(0, new, new, active)
        if slots.scores is not None:
            for r in range(3):
                for h in range(HEADS):
                    for c in range(int(lengths_after[r])):
                        slots.scores[0][r, h, c] = score(r, h, int(slots.positions[0][r, h, c]), step)
        slots.evict(0, lengths_after, active, slots.sizes[0], policy)
        for r in range(3):
            used = int(slots.lengths[0, r])
            if bool((free_before[r] >= 0).any()):  # the freed column was reused, nothing appended
                assert used == int(lengths_after[r]) and torch.equal(slots.positions[0][r, :, :].gather(
                    1, free_before[r][:, None]).squeeze(1), (slots.seen[r] - 1).int().expand(HEADS))
            for h in range(HEADS):
                dead = int(slots.free[0, r, h])
                held = [c for c in range(used) if c != dead]
                positions = slots.positions[0][r, h, held].tolist()
                assert sorted(positions) == expected[r][h][step - 1], f"row {r} head {h} step {step}"
                generated = [(c, p) for c, p in zip(held, positions) if p >= prompt_lens[r]]  # never merged
                assert [slots.keys[0][r, h, c, 0].item() for c, _ in generated] == [p for _, p in generated]


def test_a_padding_row_writes_nothing_into_a_busy_slot():
    slots = KVSlots(3, [8], 1, 1, torch.float32, "cpu", with_scores=False)
    slots.lengths[0, 2] = 8  # a full slot left by a finished sequence: column 8 does not exist
    before = slots.lengths.clone()
    lengths = slots.append(0, torch.ones(3, 1, 1), torch.ones(3, 1, 1), torch.tensor([True, False, False]))
    assert lengths.tolist() == [1, 0, 8] and torch.equal(slots.lengths[0, 1:], before[0, 1:])
