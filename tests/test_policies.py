"""Configuring methods, and what each baseline keeps and evicts."""

from dataclasses import fields

import pytest
import torch

from conftest import encode
from elastic_ray import CacheConfig
from elastic_ray.flags import parse_cache_option
from elastic_ray.hf.generate import generate_compressed
from elastic_ray.kv import METHODS, ElasticCache, ElasticVLCache, H2OCache, StreamingCache
from elastic_ray.kv.policy import MAX_INT_OPTION
from elastic_ray.kv.entries import apply_selection


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"method": "snapkv", "budget": 0.5}, r"unknown cache method 'snapkv'; allowed: \['elastic', 'elastic-vl', 'full', 'h2o', 'streaming'\]"),
        ({"method": "elastic", "budget": 0.0}, r"budget must be in \(0, 1\]"),
        ({"method": "elastic", "budget": 1.5}, r"budget must be in \(0, 1\]"),
        ({"method": "elastic", "budget": "half"}, r"budget must be a number"),
        ({"method": "elastic", "budget": 0.5, "window": 3}, r"no option\(s\) \['window'\]; allowed: \['assign', 'importance', 'layer_budgets', 'merge', 'offset', 'positions', 'protect', 'protect_prefix', 'protect_text', 'sink'\]"),
        ({"method": "streaming", "budget": 0.5, "merge": True}, r"allowed: \['layer_budgets', 'sink'\]"),
        ({"method": "elastic", "budget": 0.5, "positions": "shifted"}, r"positions must be one of \('original', 'compact'\)"),
        ({"method": "elastic", "budget": 0.5, "importance": "max"}, r"importance must be one of \('sum', 'mean', 'instruction'\)"),
        ({"method": "elastic-vl", "budget": 0.5, "assign": "value"}, r"elastic-vl option assign must be one of \('position', 'key'\)"),
        ({"method": "elastic", "budget": 0.5, "protect_text": "yes"}, r"elastic option protect_text must be bool"),
        ({"method": "full", "budget": 0.5}, r"budget must be 1.0"),
        ({"method": "elastic", "budget": 0.5, "protect": "16"}, r"elastic option protect must be int, got '16'"),
        ({"method": "elastic", "budget": 0.5, "offset": 2.5}, r"elastic option offset must be int"),
        ({"method": "elastic", "budget": 0.5, "sink": True}, r"elastic option sink must be int, got True"),
        ({"method": "elastic", "budget": 0.5, "merge": 0}, r"elastic option merge must be bool"),
        ({"method": "h2o", "budget": 0.5, "recent_ratio": "half"}, r"h2o option recent_ratio must be float"),
    ],
)
def test_bad_configurations_raise_value_error_naming_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CacheConfig(**kwargs)


@pytest.mark.parametrize("method,option,value,low", [
    ("elastic", "sink", 2**63, 0),
    ("elastic", "protect", 10**30, 0),
    ("elastic", "protect", MAX_INT_OPTION + 1, 0),
    ("elastic", "sink", -1, 0),
    ("elastic", "offset", 0, 1),
    ("elastic-vl", "offset", 2**64, 1),
    ("streaming", "sink", 2**40, 0),
])
def test_every_integer_option_is_bounded_and_refused_by_name(method, option, value, low):
    with pytest.raises(ValueError, match=rf"{method} option {option} must be in \[{low}, {MAX_INT_OPTION}\], got {value}"):
        CacheConfig(method, 0.5, **{option: value})


def test_integer_options_at_their_bounds_run(tiny_llava, images):
    for cls in METHODS.values():
        ints = {f.name: f.metadata.get("min", 0) for f in fields(cls) if f.type is int}
        for bound in ({name: MAX_INT_OPTION for name in ints}, ints):
            policy = CacheConfig(cls.name, 1.0 if cls.name == "full" else 0.5, **bound).policy
            assert policy.peak_entries(40, 8) <= 48
            generate_compressed(tiny_llava[0], encode(tiny_llava, images), policy, max_new_tokens=3)


def test_elastic_is_the_published_method_and_elastic_vl_the_preset():
    published = CacheConfig("elastic", 0.5).policy
    assert (published.protect_text, published.importance, published.assign) == (False, "sum", "position")
    preset = CacheConfig("elastic-vl", 0.5).policy
    assert isinstance(preset, ElasticVLCache) and preset.name == "elastic-vl"
    assert (preset.protect_text, preset.importance, preset.assign) == (True, "instruction", "key")
    assert (preset.sink, preset.protect, preset.offset, preset.merge) == (1, 1, MAX_INT_OPTION, True)
    assert preset.truncation_points(torch.tensor([300, 20])).tolist() == [1, 1]  # the sink
    # the options from a command line (--cache-option KEY=VALUE) give the same method under its own name
    options = dict(map(parse_cache_option, ["protect_text=true", "importance=instruction", "assign=key"]))
    assert options == {"protect_text": True, "importance": "instruction", "assign": "key"}
    assert CacheConfig("elastic", 0.5, **options).policy == ElasticCache(budget=0.5, **options)
    assert CacheConfig("elastic-vl", 0.5, importance="sum").policy.importance == "sum"


def test_config_builds_the_method_with_its_options():
    config = CacheConfig(method="elastic", budget=0.2, offset=10, merge=False)
    assert config.policy == ElasticCache(budget=0.2, offset=10, merge=False)
    assert config.to_dict() == {"method": "elastic", "budget": 0.2, "offset": 10, "merge": False}


def positions_kept(policy, scores, lengths):
    width = int(lengths.max())
    keys = torch.zeros(len(lengths), 2, width, 1)
    kept = apply_selection(keys, keys, policy.select_prompt(scores, lengths))
    return kept.positions, kept.lengths


def test_streaming_keeps_the_sinks_and_the_most_recent_entries():
    positions, lengths = positions_kept(StreamingCache(budget=0.5, sink=4), None, torch.tensor([20, 9]))
    assert positions[0, 0, : lengths[0]].tolist() == [0, 1, 2, 3] + list(range(14, 20))
    assert positions[1, 0, : lengths[1]].tolist() == [0, 1, 2, 3, 8]  # C0 = 9 - 4 = 5


def test_h2o_keeps_per_head_heavy_hitters_plus_a_recent_window():
    scores = torch.zeros(1, 2, 10)
    scores[0, 0, 2], scores[0, 0, 5] = 3.0, 2.0
    scores[0, 1, 1], scores[0, 1, 3] = 3.0, 2.0
    positions, lengths = positions_kept(H2OCache(budget=0.4, recent_ratio=0.5), scores, torch.tensor([10]))
    assert lengths.tolist() == [4]
    assert positions[0, 0].tolist() == [2, 5, 8, 9]
    assert positions[0, 1].tolist() == [1, 3, 8, 9]


def test_h2o_evicts_the_least_attended_entry_outside_the_recent_window():
    policy = H2OCache(budget=0.5, recent_ratio=0.5)
    scores = torch.tensor([[[5.0, 0.5, 2.0, 0.9, 0.0, 0.0]], [[5.0, 3.0, 2.0, 4.0, 0.0, 0.0]]])
    positions = torch.arange(6).expand(2, 1, 6)
    victims = policy.victims(positions, torch.tensor([6, 6]), None, seen=torch.tensor([6, 6]), scores=scores)
    # The recent window (floor(0.5 * 5) = 2 newest entries) is safe despite its zero scores.
    assert victims[:, 0].tolist() == [1, 2]


def test_h2o_breaks_ties_by_age_wherever_the_entries_sit():
    policy = H2OCache(budget=0.5, recent_ratio=0.5)
    # columns hold positions 3, 0, 5, 1, 2, 4: entries 0 and 3 tie for the least attention
    positions = torch.tensor([[[3, 0, 5, 1, 2, 4]]])
    scores = torch.tensor([[[1.0, 1.0, 0.0, 2.0, 3.0, 0.0]]])
    victim = policy.victims(positions, torch.tensor([6]), None, seen=torch.tensor([6]), scores=scores)
    assert victim.tolist() == [[1]]  # the column of position 0, the older of the two


def test_elastic_evicts_at_its_fixed_truncation_point():
    policy = ElasticCache(budget=0.5, offset=25)
    truncation = policy.truncation_points(torch.tensor([300, 20]))
    assert truncation.tolist() == [275, 1]  # max(sink, C0 - offset)
    positions = torch.arange(301).expand(2, 3, 301)
    victims = policy.victims(positions, torch.tensor([301, 21]), truncation, torch.tensor([600, 40]), None)
    assert victims.tolist() == [[275] * 3, [1] * 3]


def test_elastic_evicts_the_oldest_entry_after_the_truncation_point_in_any_column():
    policy = ElasticCache(budget=0.5)
    # the first two columns are frozen; after them, positions 7, 4, 9 sit in any order
    positions = torch.tensor([[[0, 2, 7, 4, 9, 99]]])
    victim = policy.victims(positions, torch.tensor([5]), torch.tensor([2]), torch.tensor([10]), None)
    assert victim.tolist() == [[3]]  # position 4; column 5 is past the row's entries
    shorter = policy.victims(positions, torch.tensor([2]), torch.tensor([3]), torch.tensor([10]), None)
    assert shorter.tolist() == [[1]]  # a row shorter than its truncation point evicts its newest


def test_every_method_slot_fits_its_peak():
    for policy in (ElasticCache(budget=0.2), H2OCache(budget=0.2), StreamingCache(budget=0.2)):
        assert policy.peak_entries(616, 256) <= 0.2 * (616 + 256) + 2
