"""The prompt stage (spec §3, §10): anchors, nearest-anchor merging, edge cases, batched = pure."""

import random

import pytest
import torch

from elastic_ray.kv import ElasticCache, compress_prompt
from elastic_ray.kv.entries import apply_selection


def squares(length: int):
    """keys[0, t, 0] = t^2 and values = 10 t^2, so every merged mean is checkable by hand."""
    keys = torch.tensor([float(t * t) for t in range(length)]).view(1, length, 1)
    return keys, 10 * keys


def test_merge_on_a_hand_checked_example():
    keys, values = squares(8)
    # Candidates are 1..6; a 3-way tie at score 5 picks the two lowest positions, 2 and 4.
    scores = torch.tensor([9.0, 1, 5, 2, 5, 0, 5, 9])
    out_keys, out_values, kept = compress_prompt(keys, values, scores, 0.5, sink=1, protect=1)
    assert kept.tolist() == [0, 2, 4, 7]
    # 1 -> 2; 3 is equidistant from 2 and 4 and joins the earlier; 5 and 6 -> 4.
    expected = torch.tensor([0.0, (1 + 4 + 9) / 3, (16 + 25 + 36) / 3, 49])
    torch.testing.assert_close(out_keys.flatten(), expected)
    torch.testing.assert_close(out_values.flatten(), 10 * expected)


def test_budget_one_returns_the_same_tensors_bit_for_bit():
    keys, values = torch.randn(4, 33, 8), torch.randn(4, 33, 8)
    out_keys, out_values, kept = compress_prompt(keys, values, torch.rand(33), 1.0)
    assert out_keys is keys and out_values is values
    assert kept.tolist() == list(range(33))


def test_no_anchors_left_means_candidates_are_dropped_not_merged():
    keys, values = squares(5)
    out_keys, _, kept = compress_prompt(keys, values, torch.ones(5), 0.2, sink=1, protect=1)
    assert kept.tolist() == [0, 4]
    assert out_keys.flatten().tolist() == [0.0, 16.0]


def test_sink_and_protected_tail_are_kept_and_never_merged_into():
    keys, values = squares(12)
    scores = torch.zeros(12)
    scores[6] = 1.0
    out_keys, _, kept = compress_prompt(keys, values, scores, 0.4, sink=2, protect=2)
    assert kept.tolist() == [0, 1, 6, 10, 11]  # C0 = 12 - floor(7.2) = 5: one anchor
    assert out_keys.flatten()[:2].tolist() == [0.0, 1.0] and out_keys.flatten()[-2:].tolist() == [100.0, 121.0]
    assert out_keys.flatten()[2] == pytest.approx(sum(t * t for t in range(2, 10)) / 8)


def test_prompts_no_longer_than_the_protected_entries_are_left_alone():
    keys, values = squares(2)
    out_keys, _, kept = compress_prompt(keys, values, torch.ones(2), 0.1)
    assert out_keys is keys and kept.tolist() == [0, 1]


def test_protect_text_keeps_every_text_token_and_merges_image_tokens_into_image_anchors():
    keys, values = squares(10)
    image = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)  # text, 6 image tokens, text
    scores = torch.tensor([9.0, 0, 0, 1, 0, 0, 0, 0, 9, 9])
    out_keys, _, kept = compress_prompt(keys, values, scores, 0.6, image=image, protect_text=True)
    # C0 = 10 - 4 = 6: the 4 text tokens and 2 image anchors, 3 (highest score) and 2 (lowest position)
    assert kept.tolist() == [0, 1, 2, 3, 8, 9]
    # 4..7 all join anchor 3, the nearest; the text token 8 is nearer to 7 but is no anchor
    expected = [0.0, 1.0, 4.0, (9 + 16 + 25 + 36 + 49) / 5, 64.0, 81.0]
    torch.testing.assert_close(out_keys.flatten(), torch.tensor(expected))


def test_protect_text_falls_back_to_the_published_selection_when_text_alone_exceeds_c0():
    keys, values = squares(10)
    image = torch.tensor([0, 0, 0, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)  # 7 text tokens
    scores = torch.rand(10)
    published = compress_prompt(keys, values, scores, 0.5, image=image)
    protected = compress_prompt(keys, values, scores, 0.5, image=image, protect_text=True)
    assert protected[2].tolist() == published[2].tolist() and len(published[2]) == 5
    torch.testing.assert_close(protected[0], published[0])
    # exactly C0 protected entries: they are kept and every image token is dropped, not merged
    image = torch.tensor([0, 0, 1, 1, 1, 1, 1, 0, 0, 0], dtype=torch.bool)  # 5 text tokens, C0 = 5
    out_keys, _, kept = compress_prompt(keys, values, scores, 0.5, image=image, protect_text=True)
    assert kept.tolist() == [0, 1, 7, 8, 9] and out_keys.flatten().tolist() == [0.0, 1.0, 49.0, 64.0, 81.0]


def test_without_protect_prefix_the_text_before_the_image_competes_for_anchors_and_the_instruction_stays():
    keys, values = squares(12)
    image = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)  # 4 prefix, 6 image, 2 after
    scores = torch.tensor([9.0, 0, 0, 0, 0, 5, 0, 0, 4, 0, 9, 9])
    # C0 = 6. Protecting all text (sink, 1..3, 10, tail) fills C0: the image is dropped whole.
    starved = compress_prompt(keys, values, scores, 0.5, image=image, protect_text=True)[2]
    assert starved.tolist() == [0, 1, 2, 3, 10, 11]
    out_keys, _, kept = compress_prompt(keys, values, scores, 0.5, image=image, protect_text=True, protect_prefix=False)
    # sink 0, the instruction 10 and the tail 11 kept whole; 1..9 compete for 3 anchors: 5 and 8 (highest
    # scores) and 1 (lowest position of the ties); the prefix merges like an image token
    assert kept.tolist() == [0, 1, 5, 8, 10, 11]
    expected = [0.0, (1 + 4 + 9) / 3, (16 + 25 + 36) / 3, (49 + 64 + 81) / 3, 100.0, 121.0]
    torch.testing.assert_close(out_keys.flatten(), torch.tensor(expected))
    # a row without image tokens has no prefix: all its text is protected, as with protect_prefix
    no_image = torch.zeros(12, dtype=torch.bool)
    assert compress_prompt(keys, values, scores, 0.9, image=no_image, protect_text=True, protect_prefix=False)[2].tolist() \
        == compress_prompt(keys, values, scores, 0.9, image=no_image, protect_text=True)[2].tolist()


def test_assign_key_merges_each_entry_into_the_anchor_with_the_most_similar_key():
    # two heads, one dimension each: the cosine is over both heads' keys concatenated
    directions = {"a": (1.0, 0.0), "b": (0.0, 1.0), "c": (1.0, 1.0)}
    layout = ["a", "a", "b", "a", "b", "c", "a"]  # positions 0..6; anchors will be 1 and 4
    keys = torch.tensor([directions[d] for d in layout]).T.unsqueeze(-1)  # [2, 7, 1]
    keys = keys * torch.arange(1.0, 8.0)[None, :, None]  # lengths differ; the cosine ignores them
    values = torch.arange(7.0).expand(2, 7).unsqueeze(-1)
    scores = torch.tensor([0.0, 5, 0, 0, 5, 0, 0])
    out_keys, out_values, kept = compress_prompt(keys, values, scores, 0.5, sink=1, protect=1, assign="key")
    assert kept.tolist() == [0, 1, 4, 6]
    # 2 ("b") joins 4 though 1 is nearer, 3 ("a") joins 1 though 4 is nearer; 5 ("c") is as similar to both
    # and joins the earlier, 1
    assert out_values[0, :, 0].tolist() == [0.0, (1 + 3 + 5) / 3, (2 + 4) / 2, 6.0]
    nearest = compress_prompt(keys, values, scores, 0.5, sink=1, protect=1)[1]
    assert nearest[0, :, 0].tolist() == [0.0, (1 + 2) / 2, (3 + 4 + 5) / 3, 6.0]


@pytest.mark.parametrize("protect_text,protect_prefix", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("assign", ["position", "key"])
@pytest.mark.parametrize("merge", [True, False])
def test_the_batched_path_agrees_with_the_pure_function_for_every_option(protect_text, protect_prefix, assign, merge):
    rng = random.Random(1)
    for trial in range(30):
        budget = rng.choice([0.1, 0.2, 0.35, 0.5, 0.9, 1.0])
        sink, protect = rng.choice([0, 1, 2]), rng.choice([0, 1, 3])
        lengths = torch.tensor([rng.randint(1, 40) for _ in range(3)])
        width = int(lengths.max())
        # keys drawn from 5 random ones: equal keys tie exactly in similarity, different ones are far apart
        keys = torch.randn(5, 2, 4)[torch.randint(0, 5, (3, width))].transpose(1, 2).contiguous()
        values = torch.randn(3, 2, width, 4)
        scores = torch.randint(0, 4, (3, width)).float()
        start = [rng.randint(0, 10) for _ in range(3)]  # image tokens in [start, start + 20)
        image = torch.stack([(torch.arange(width) >= s) & (torch.arange(width) < s + 20) for s in start])
        policy = ElasticCache(budget=budget, sink=sink, protect=protect, merge=merge, protect_text=protect_text,
                              protect_prefix=protect_prefix, assign=assign)
        batched = apply_selection(keys, values, policy.select_prompt(scores, lengths, image=image, keys=keys))
        for row, length in enumerate(lengths.tolist()):
            k, v = keys[row, :, :length], values[row, :, :length]
            ref_k, ref_v, kept = compress_prompt(k, v, scores[row, :length], budget, sink=sink, protect=protect,
                                                 image=image[row, :length], protect_text=protect_text,
                                                 protect_prefix=protect_prefix, assign=assign)
            if not merge:
                ref_k, ref_v = k[:, kept], v[:, kept]
            n = int(batched.lengths[row])
            assert n == policy.prompt_kept(length)
            assert batched.positions[row, 0, :n].tolist() == kept.tolist(), (trial, row)
            torch.testing.assert_close(batched.keys[row, :, :n], ref_k, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(batched.values[row, :, :n], ref_v, rtol=1e-6, atol=1e-6)
