"""Version 2 of the shapes data set (for demo-v2): photo-like scenes, descriptions, relations.

A scene is 224 px: 1 to 4 of the v1 objects (each colour-and-shape pair at most once) on the
3x3 grid, over a textured background (plain, striped, checkered or dotted, under a lighting
gradient), the objects shaded by the same light. In about a third of the scenes with two
neighbouring objects, they are pushed together so that one partly hides the other. The
textures repeat every 8 px and objects span several 16 px patches, so neighbouring image tokens
are largely redundant, as in photographs.

Targets: the v1 caption (instruction ``Describe the image.``, the same grammar and scoring), a
multi-sentence description (``Describe the image in detail.``)::

    There are two objects on a striped background. A large red circle is at the top left.
    A small blue cross is at the top middle, right of the red circle. The blue cross is partly
    hidden by the red circle.

and short answers: the v1 question kinds plus the background's pattern and yes/no relations
("Is the red circle left of the blue cross?", half of them true). Splits follow v1's rule over
the object set, so a test object set is never trained on, in either version.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import islice
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from elastic_ray.data.shapes import (
    CELLS,
    COLORS,
    NUMBERS,
    SHAPES,
    SIZES,
    SPLITS,
    Scene,
    ShapeObject,
    caption_of,
    draw_shape,
    questions_of,
    scene_key,
    split_of,
)
from elastic_ray.data.shapes import question_kind as v1_question_kind

DESCRIPTION_INSTRUCTION = "Describe the image in detail."
IMAGE_SIZE = 224
PATTERNS = ("plain", "striped", "checkered", "dotted")
PERIOD = 8  # texture period in pixels: every 16 px patch of background shows the same texture
OCCLUSION_RATE = 0.35  # share of scenes with a neighbouring pair that get one object partly hidden
OVERLAP = 0.6  # overlap of an occluding pair, as a share of the smaller object's radius
MIN_HIDDEN = 0.05  # hidden share of an object's pixels for the description to call it hidden
RELATIONS = ("left of", "right of", "above", "below")
NOISE = 6


@dataclass
class DetailedScene(Scene):
    """A v2 scene: the v1 fields (objects sorted by cell, caption, questions) and more."""

    background: str  # one of PATTERNS
    hidden: tuple[ShapeObject, ShapeObject] | None  # (partly hidden object, the object in front)
    description: str
    object_map: np.ndarray  # (H, W) uint8: 1 + index in `objects` of the object seen at each pixel, 0 = none

    @property
    def long_targets(self) -> list[tuple[str, str]]:
        """The caption and the description, each with its instruction."""
        return [*super().long_targets, (DESCRIPTION_INSTRUCTION, self.description)]


def object_name(o: ShapeObject) -> str:
    """How the description and the questions name an object: "red circle" (unique in a scene)."""
    return f"{o.color} {o.shape}"


def holds(relation: str, a: ShapeObject, b: ShapeObject) -> bool:
    """Whether `a` is `relation` `b`, judged by their grid cells."""
    (row_a, col_a), (row_b, col_b) = divmod(a.cell, 3), divmod(b.cell, 3)
    return {"left of": col_a < col_b, "right of": col_a > col_b,
            "above": row_a < row_b, "below": row_a > row_b}[relation]


def placement(a: ShapeObject, b: ShapeObject) -> str:
    """Where `a` lies relative to `b`, which comes before it in cell order."""
    vertical = "below" if holds("below", a, b) else ""
    horizontal = next((r for r in ("left of", "right of") if holds(r, a, b)), "")
    if vertical and horizontal:
        return f"below and {horizontal}"
    return vertical or horizontal


def description_of(objects: tuple[ShapeObject, ...], background: str,
                   hidden: tuple[ShapeObject, ShapeObject] | None) -> str:
    """The reference description: count and background, each object placed against the one
    before it, then which object is partly hidden."""
    n = len(objects)
    sentences = [f"There {'is one object' if n == 1 else f'are {NUMBERS[n]} objects'} on a {background} background."]
    for i, o in enumerate(objects):
        where = f"A {o.size} {o.color} {o.shape} is {o.location}"
        sentences.append(where + (f", {placement(o, objects[i - 1])} the {object_name(objects[i - 1])}." if i else "."))
    if hidden:
        sentences.append(f"The {object_name(hidden[0])} is partly hidden by the {object_name(hidden[1])}.")
    return " ".join(sentences)


def questions_v2(objects: tuple[ShapeObject, ...], background: str,
                 rng: np.random.Generator) -> list[tuple[str, str]]:
    """The v1 questions, the background's pattern and, with two or more objects, one true and one
    false relation between two objects."""
    qa = questions_of(objects) + [("What pattern is the background?", background)]
    if len(objects) >= 2:
        for answer in ("yes", "no"):
            i, j = rng.choice(len(objects), size=2, replace=False)
            a, b = objects[i], objects[j]
            candidates = [r for r in RELATIONS if holds(r, a, b) == (answer == "yes")]
            relation = candidates[rng.integers(len(candidates))]
            qa.append((f"Is the {object_name(a)} {relation} the {object_name(b)}?", answer))
    return qa


def question_kind(question: str) -> str:
    """The kind of a v2 question: the v1 kinds, background or relation."""
    if question.startswith("What pattern"):
        return "background"
    if question.startswith("Is the "):
        return "relation"
    return v1_question_kind(question)


def detailed_scene_rng(seed: int, split: str) -> np.random.Generator:
    """The random generator behind the (seed, split) stream of v2 scenes (not v1's)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return np.random.default_rng([seed, SPLITS.index(split), 2])


def iter_detailed_scenes(seed: int = 0, split: str = "train") -> Iterator[DetailedScene]:
    """An endless, deterministic stream of v2 scenes of one split."""
    return detailed_scenes_from(detailed_scene_rng(seed, split), split)


def make_detailed_scenes(n: int, seed: int = 0, split: str = "train") -> list[DetailedScene]:
    """The first `n` scenes of the (seed, split) v2 stream."""
    return list(islice(iter_detailed_scenes(seed, split), n))


def detailed_scenes_from(rng: np.random.Generator, split: str) -> Iterator[DetailedScene]:
    """v2 scenes of one split drawn from `rng`; like `shapes.scenes_from`, resumable from its state."""
    kinds = [(color, shape) for color in COLORS for shape in SHAPES]
    while True:
        count = int(rng.integers(1, 5))
        cells = sorted(int(c) for c in rng.choice(len(CELLS), size=count, replace=False))
        picked = rng.choice(len(kinds), size=count, replace=False)
        objects = tuple(ShapeObject(cell=cell, shape=kinds[k][1], color=kinds[k][0], size=SIZES[rng.integers(len(SIZES))])
                        for cell, k in zip(cells, picked))
        if split_of(scene_key(objects)) != split:
            continue
        background = PATTERNS[rng.integers(len(PATTERNS))]
        pair = _occluding_pair(objects, rng)
        image, object_map, areas = _render(objects, background, pair, rng)
        hidden = None
        if pair and 1 - (object_map == pair[0] + 1).sum() / areas[pair[0]] >= MIN_HIDDEN:
            hidden = (objects[pair[0]], objects[pair[1]])
        yield DetailedScene(image, objects, caption_of(objects), questions_v2(objects, background, rng),
                            background, hidden, description_of(objects, background, hidden), object_map)


def _occluding_pair(objects: tuple[ShapeObject, ...], rng: np.random.Generator) -> tuple[int, int] | None:
    """(behind, in front): indices of two objects in neighbouring cells to push together, or None."""
    pairs = [(i, j) for i, a in enumerate(objects) for j, b in enumerate(objects)
             if i < j and abs(a.cell // 3 - b.cell // 3) + abs(a.cell % 3 - b.cell % 3) == 1]
    if not pairs or rng.random() >= OCCLUSION_RATE:
        return None
    i, j = pairs[rng.integers(len(pairs))]
    return (i, j) if rng.random() < 0.5 else (j, i)


def _render(objects: tuple[ShapeObject, ...], background: str, pair: tuple[int, int] | None,
            rng: np.random.Generator) -> tuple[Image.Image, np.ndarray, list[int]]:
    """The image, its object map, and each object's pixel count were nothing in front of it."""
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    light = rng.normal(size=2)
    light *= rng.uniform(0.05, 0.15) / np.linalg.norm(light) / 0.5
    shade = (1 + light[0] * (xs / IMAGE_SIZE - 0.5) + light[1] * (ys / IMAGE_SIZE - 0.5))[..., None]
    pixels = _texture(background, xs, ys, rng) * shade
    object_map = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    areas = [0] * len(objects)
    order = [i for i in range(len(objects)) if not pair or i != pair[1]] + ([pair[1]] if pair else [])
    centres = _centres(objects, pair, rng)
    for i in order:
        mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        draw_shape(ImageDraw.Draw(mask), objects[i].shape, *centres[i], 255)
        covered = np.asarray(mask) > 0
        areas[i] = int(covered.sum())
        pixels[covered] = (np.array(COLORS[objects[i].color]) * shade)[covered]
        object_map[covered] = i + 1
    pixels += rng.integers(-NOISE, NOISE + 1, size=pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB"), object_map, areas


def _texture(background: str, xs: np.ndarray, ys: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float background: a dull base colour and a pattern in a lighter or darker tone."""
    base = rng.uniform(50, 110) + rng.integers(-12, 13, size=3)
    tone = base + rng.choice([-1, 1]) * rng.uniform(22, 40)
    x, y = xs + rng.integers(PERIOD), ys + rng.integers(PERIOD)
    half = PERIOD // 2
    if background == "plain":
        pattern = np.zeros(xs.shape, dtype=bool)
    elif background == "striped":
        pattern = ((y, x, x + y)[rng.integers(3)] % PERIOD) < half
    elif background == "checkered":
        pattern = (x // half + y // half) % 2 == 0
    elif background == "dotted":
        pattern = (x % PERIOD - (PERIOD - 1) / 2) ** 2 + (y % PERIOD - (PERIOD - 1) / 2) ** 2 <= 2.5 ** 2
    else:
        raise ValueError(f"unknown background {background!r}")
    return np.where(pattern[..., None], tone, base)


def _centres(objects: tuple[ShapeObject, ...], pair: tuple[int, int] | None,
             rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """(cx, cy, radius) in pixels: each object jittered inside its cell; an occluding pair pushed
    together across their shared border, by OVERLAP of the smaller radius, both still centred in
    their own cells."""
    cell = IMAGE_SIZE / 3
    radii = [cell * (0.42 if o.size == "large" else 0.25) for o in objects]
    centres = []
    for o, r in zip(objects, radii):
        slack = cell / 2 - r - 1
        row, col = divmod(o.cell, 3)
        centres.append([(col + 0.5) * cell + rng.uniform(-slack, slack), (row + 0.5) * cell + rng.uniform(-slack, slack)])
    if pair:
        first, second = sorted(pair, key=lambda i: objects[i].cell)  # second is right of or below first
        axis = 0 if objects[first].cell // 3 == objects[second].cell // 3 else 1
        gap = radii[first] + radii[second] - OVERLAP * min(radii[first], radii[second])
        border = divmod(objects[second].cell, 3)[1 - axis] * cell + rng.uniform(-0.05, 0.05) * cell
        across = (divmod(objects[first].cell, 3)[axis] + 0.5) * cell  # the shared row (or column) centre
        across += rng.uniform(-1, 1) * (cell / 2 - max(radii[first], radii[second]) - 1)
        for i, offset in ((first, -gap / 2), (second, gap / 2)):
            centres[i][axis], centres[i][1 - axis] = border + offset, across
    return [(cx, cy, r) for (cx, cy), r in zip(centres, radii)]


# --- Reading a description back ----------------------------------------------------------------

_OBJECT = r"(small|large) ({colors}) ({shapes})".format(colors="|".join(COLORS), shapes="|".join(SHAPES))
_LOCATION = r"(?:at the|in the) ({cells})".format(cells="|".join(CELLS))
_NAME = r"({colors}) ({shapes})".format(colors="|".join(COLORS), shapes="|".join(SHAPES))
_FIRST_RE = re.compile(r"There (?:is one object|are (\w+) objects) on an? (\w+) background\.")
_PLACED_RE = re.compile(rf"A {_OBJECT} is {_LOCATION}(?:, (below and left of|below and right of|below|left of|right of) the {_NAME})?\.")
_HIDDEN_RE = re.compile(rf"The {_NAME} is partly hidden by the {_NAME}\.")


@dataclass(frozen=True)
class ParsedDescription:
    """What a description states."""

    count: int
    background: str
    objects: tuple[ShapeObject, ...]  # in the order described
    placements: tuple[tuple[str, str, str], ...]  # (object name, placement, name of the object before it)
    hidden: tuple[str, str] | None  # (hidden object's name, name of the one in front)


def parse_description(text: str) -> ParsedDescription:
    """The facts of a description in the grammar of `description_of`; ValueError if it does not parse."""
    sentences = re.findall(r"[^.]+\.", text)
    if not sentences or not (first := _FIRST_RE.fullmatch(sentences[0].strip())):
        raise ValueError(f"not a shapes description: {text!r}")
    count = 1 if first.group(1) is None else NUMBERS.index(first.group(1))
    objects, placements, hidden = [], [], None
    for sentence in (s.strip() for s in sentences[1:]):
        if placed := _PLACED_RE.fullmatch(sentence):
            size, color, shape, cell, relation, other_color, other_shape = placed.groups()
            objects.append(ShapeObject(CELLS.index(cell), shape, color, size))
            if relation:
                placements.append((f"{color} {shape}", relation, f"{other_color} {other_shape}"))
        elif (covered := _HIDDEN_RE.fullmatch(sentence)) and hidden is None:
            hidden = (" ".join(covered.groups()[:2]), " ".join(covered.groups()[2:]))
        else:
            raise ValueError(f"not a shapes description sentence: {sentence!r}")
    return ParsedDescription(count, first.group(2), tuple(objects), tuple(placements), hidden)
