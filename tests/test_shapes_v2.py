"""The v2 shapes data set: determinism, disjoint splits, descriptions that parse back to the
scene, questions with right answers, and an image that matches its object map."""

import io
from itertools import islice

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from elastic_ray.data.shapes import (
    CAPTION_INSTRUCTION,
    CELLS,
    COLORS,
    make_scenes,
    png_bytes,
    questions_of,
    split_of,
    write_shards,
)
from elastic_ray.data.shapes_v2 import (
    DESCRIPTION_INSTRUCTION,
    PATTERNS,
    iter_detailed_scenes,
    make_detailed_scenes,
    object_name,
    parse_description,
    question_kind,
)


def expected_relation(relation, a, b) -> bool:
    """Whether `a` is `relation` `b`, from rows and columns (row-major cells)."""
    (row_a, col_a), (row_b, col_b) = divmod(a.cell, 3), divmod(b.cell, 3)
    return {"left of": col_a < col_b, "right of": col_a > col_b, "above": row_a < row_b, "below": row_a > row_b}[relation]


def expected_placement(a, before) -> str:
    (row_a, col_a), (row_b, col_b) = divmod(a.cell, 3), divmod(before.cell, 3)
    if row_a == row_b:
        return "right of"  # cell order: the object before is to its left
    side = "" if col_a == col_b else (" and left of" if col_a < col_b else " and right of")
    return "below" + side


@pytest.fixture(scope="module")
def scenes():
    return make_detailed_scenes(300, seed=3, split="train")


def test_same_seed_same_scenes(scenes):
    again = make_detailed_scenes(300, seed=3, split="train")
    assert [(s.description, s.qa) for s in again] == [(s.description, s.qa) for s in scenes]
    assert [png_bytes(s.image) for s in again[:20]] == [png_bytes(s.image) for s in scenes[:20]]
    assert all(np.array_equal(a.object_map, b.object_map) for a, b in zip(again[:20], scenes[:20]))
    other = make_detailed_scenes(300, seed=4, split="train")
    assert [s.description for s in other] != [s.description for s in scenes]
    v1 = make_scenes(300, seed=3, split="train")
    assert [s.caption for s in v1] != [s.caption for s in scenes]  # its own stream, not v1's


def test_scene_contents(scenes):
    assert {len(s.objects) for s in scenes} == {1, 2, 3, 4}
    assert {s.background for s in scenes} == set(PATTERNS)
    hidden = [s for s in scenes if s.hidden]
    assert 0.05 < len(hidden) / len(scenes) < 0.3
    for s in scenes:
        assert s.image.mode == "RGB" and s.image.size == (224, 224) and s.object_map.shape == (224, 224)
        assert [o.cell for o in s.objects] == sorted({o.cell for o in s.objects})
        assert len({object_name(o) for o in s.objects}) == len(s.objects)  # every object has a unique name
        assert split_of(s.key) == "train"
        assert s.long_targets == [("Describe the image.", s.caption), (DESCRIPTION_INSTRUCTION, s.description)]


@pytest.mark.slow
def test_splits_never_share_an_object_set():
    train = make_detailed_scenes(2000, seed=0, split="train")
    test = make_detailed_scenes(300, seed=1, split="test")
    assert {s.key for s in train}.isdisjoint({s.key for s in test})
    assert all(split_of(s.key) == "test" for s in test)
    assert {s.key for s in make_scenes(2000, seed=0, split="train")}.isdisjoint({s.key for s in test})  # v1's too


def test_descriptions_parse_back_to_the_scene(scenes):
    for s in scenes:
        parsed = parse_description(s.description)
        assert parsed.count == len(s.objects) and parsed.background == s.background
        assert parsed.objects == s.objects  # in cell order
        assert parsed.placements == tuple(
            (f"{o.color} {o.shape}", expected_placement(o, before), f"{before.color} {before.shape}")
            for before, o in zip(s.objects, s.objects[1:]))
        assert parsed.hidden == (tuple(f"{o.color} {o.shape}" for o in s.hidden) if s.hidden else None)
    with pytest.raises(ValueError):
        parse_description(scenes[0].description.replace(". A ", ". An ", 1))
    with pytest.raises(ValueError):
        parse_description("a large red circle at the top left.")


def test_description_grammar_by_example():
    scene = next(s for s in make_detailed_scenes(200, seed=0) if s.hidden and len(s.objects) == 2)
    a, b = scene.objects
    behind, front = scene.hidden
    relation = expected_placement(b, a)
    assert scene.description == (
        f"There are two objects on a {scene.background} background. "
        f"A {a.size} {a.color} {a.shape} {'is in the center' if a.cell == 4 else f'is at the {CELLS[a.cell]}'}. "
        f"A {b.size} {b.color} {b.shape} {'is in the center' if b.cell == 4 else f'is at the {CELLS[b.cell]}'}, "
        f"{relation} the {a.color} {a.shape}. "
        f"The {behind.color} {behind.shape} is partly hidden by the {front.color} {front.shape}.")
    assert relation in ("right of", "below")  # an occluding pair are neighbours


def test_questions_are_v1s_then_background_and_relations(scenes):
    kinds, relation_answers = set(), []
    for s in scenes:
        v1 = questions_of(s.objects)  # their answers are checked in test_shapes
        assert s.qa[:len(v1)] == v1 and len({q for q, _ in s.qa}) == len(s.qa)
        background, *relations = s.qa[len(v1):]
        assert background == ("What pattern is the background?", s.background)
        assert len(relations) == (2 if len(s.objects) > 1 else 0)
        for q, a in relations:
            relation = next(r for r in ("left of", "right of", "above", "below") if f" {r} the " in q)
            first, second = q.removeprefix("Is the ").rstrip("?").split(f" {relation} the ")
            x, y = (next(o for o in s.objects if f"{o.color} {o.shape}" == n) for n in (first, second))
            assert a == ("yes" if expected_relation(relation, x, y) else "no")
            relation_answers.append(a)
        kinds |= {question_kind(q) for q, _ in s.qa}
    assert kinds == {"count", "shape", "color", "color_of", "where", "background", "relation"}
    assert relation_answers.count("yes") == relation_answers.count("no")


def test_the_image_shows_its_object_map(scenes):
    for s in scenes[:60]:
        pixels = np.asarray(s.image, dtype=np.float64)
        for i, o in enumerate(s.objects):
            shown = s.object_map == i + 1
            assert shown.sum() > 150
            colour = pixels[shown].mean(0)
            assert np.abs(colour - COLORS[o.color]).max() < 0.2 * 255, (o, colour)
        if s.hidden:
            behind = s.objects.index(s.hidden[0])
            assert (s.object_map == behind + 1).sum() > 150  # partly, not wholly, hidden


def test_neighbouring_background_patches_are_alike(scenes):
    """Textures repeat every 8 px: two neighbouring all-background 16 px patches differ by
    lighting and noise only, far less than background and object patches do."""
    background, mixed = [], []
    for s in scenes[:60]:
        pixels = np.asarray(s.image, dtype=np.float64).reshape(14, 16, 14, 16, 3).transpose(0, 2, 1, 3, 4)
        empty = (s.object_map.reshape(14, 16, 14, 16) == 0).all((1, 3))
        for r in range(14):
            for c in range(13):
                diff = np.abs(pixels[r, c] - pixels[r, c + 1]).mean()
                if empty[r, c] and empty[r, c + 1]:
                    background.append(diff)
                elif empty[r, c] != empty[r, c + 1]:
                    mixed.append(diff)
    assert np.mean(background) < 8 and np.mean(mixed) > 3 * np.mean(background)


def test_shards_of_the_v2_stream_hold_its_captions_and_images(tmp_path):

    write_shards(tmp_path, 4, rows_per_shard=2, stream=iter_detailed_scenes(3, "test"))
    rows = pq.read_table(tmp_path).to_pylist()
    scenes = list(islice(iter_detailed_scenes(3, "test"), 4))
    assert [(r["instruction"], r["reference"]) for r in rows] == [(CAPTION_INSTRUCTION, s.caption) for s in scenes]
    for row, scene in zip(rows, scenes):
        image = Image.open(io.BytesIO(row["image"])).convert("RGB")
        assert np.array_equal(np.asarray(image), np.asarray(scene.image))
