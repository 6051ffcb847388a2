"""The synthetic "shapes" data set: seeded scenes, their captions and questions, and scoring.

A scene holds 1 to 4 objects on a 3x3 grid (one per cell). Its caption lists the objects in
row-major cell order in a fixed grammar::

    a large red circle at the top left, a small blue cross in the center and a large green
    square at the bottom right.

Train and test scenes never share an object set: the split of a scene is a stable hash of its
canonical key, and each split's generator rejects the other split's keys.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 40, 40),
    "orange": (250, 150, 30),
    "yellow": (240, 230, 60),
    "green": (40, 180, 60),
    "blue": (50, 110, 240),
    "purple": (170, 70, 220),
}
SIZES = ("small", "large")
CELLS = (
    "top left", "top middle", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom middle", "bottom right",
)
NUMBERS = ("zero", "one", "two", "three", "four")
SPLITS = ("train", "test")
CAPTION_INSTRUCTION = "Describe the image."
IMAGE_SIZE = 112
BACKGROUND = 48
NOISE = 8


@dataclass(frozen=True, order=True)
class ShapeObject:
    """One object of a scene; `cell` indexes CELLS (row-major)."""

    cell: int
    shape: str
    color: str
    size: str

    @property
    def location(self) -> str:
        """The object's place as the grammar says it: "at the top left", "in the center"."""
        return "in the center" if CELLS[self.cell] == "center" else f"at the {CELLS[self.cell]}"

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {self.location}"


@dataclass
class Scene:
    """A rendered scene with its objects (sorted by cell), caption and (question, answer) pairs."""

    image: Image.Image
    objects: tuple[ShapeObject, ...]
    caption: str
    qa: list[tuple[str, str]]

    @property
    def key(self) -> str:
        return scene_key(self.objects)

    @property
    def long_targets(self) -> list[tuple[str, str]]:
        """(instruction, reference) of the scene's answers longer than a question's: its caption."""
        return [(CAPTION_INSTRUCTION, self.caption)]


def scene_key(objects: Iterable[ShapeObject]) -> str:
    """Canonical key of an object set, independent of order and of rendering noise."""
    return "|".join(f"{o.cell}:{o.size}-{o.color}-{o.shape}" for o in sorted(objects))


def split_of(key: str) -> str:
    """The split a scene key belongs to: "test" for about one key in ten."""
    digest = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return "test" if digest % 10 == 0 else "train"


def caption_of(objects: Iterable[ShapeObject]) -> str:
    """The ground-truth caption: objects in cell order, "a X, a Y and a Z."."""
    phrases = [o.phrase for o in sorted(objects)]
    if len(phrases) == 1:
        return phrases[0] + "."
    return ", ".join(phrases[:-1]) + " and " + phrases[-1] + "."


def questions_of(objects: Iterable[ShapeObject]) -> list[tuple[str, str]]:
    """Count, shape, colour and position questions, keeping only those with a unique answer."""
    objects = sorted(objects)
    shapes = Counter(o.shape for o in objects)
    kinds = Counter((o.color, o.shape) for o in objects)
    qa = [("How many objects are there?", NUMBERS[len(objects)])]
    for o in objects:
        qa.append((f"What shape is {o.location}?", o.shape))
        qa.append((f"What color is the shape {o.location}?", o.color))
        if shapes[o.shape] == 1:
            qa.append((f"What color is the {o.shape}?", o.color))
        if kinds[o.color, o.shape] == 1:
            qa.append((f"Where is the {o.color} {o.shape}?", CELLS[o.cell]))
    return qa


def question_kind(question: str) -> str:
    """The kind of a `questions_of` question: count, shape, color, color_of (a shape) or where."""
    for prefix, kind in (("How many", "count"), ("What shape", "shape"), ("What color is the shape ", "color"),
                         ("What color", "color_of"), ("Where", "where")):
        if question.startswith(prefix):
            return kind
    raise ValueError(f"not a shapes question: {question!r}")


def scene_rng(seed: int, split: str) -> np.random.Generator:
    """The random generator behind the (seed, split) stream of scenes."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return np.random.default_rng([seed, SPLITS.index(split)])


def iter_scenes(seed: int = 0, split: str = "train", image_size: int = IMAGE_SIZE) -> Iterator[Scene]:
    """An endless, deterministic stream of scenes of one split."""
    return scenes_from(scene_rng(seed, split), split, image_size)


def scenes_from(rng: np.random.Generator, split: str, image_size: int = IMAGE_SIZE) -> Iterator[Scene]:
    """Scenes of one split drawn from `rng`. Between two scenes the stream's whole state is
    `rng`'s, so saving `rng.bit_generator.state` and building a new stream on a generator set to
    it continues the stream exactly (resumable training)."""
    colors = list(COLORS)
    while True:
        count = int(rng.integers(1, 5))
        cells = sorted(int(c) for c in rng.choice(len(CELLS), size=count, replace=False))
        objects = tuple(
            ShapeObject(
                cell=cell,
                shape=SHAPES[rng.integers(len(SHAPES))],
                color=colors[rng.integers(len(colors))],
                size=SIZES[rng.integers(len(SIZES))],
            )
            for cell in cells
        )
        if split_of(scene_key(objects)) != split:
            continue
        image = _render(objects, image_size, rng)
        yield Scene(image, objects, caption_of(objects), questions_of(objects))


def make_scenes(n: int, seed: int = 0, split: str = "train", image_size: int = IMAGE_SIZE) -> list[Scene]:
    """The first `n` scenes of the (seed, split) stream."""
    return list(islice(iter_scenes(seed, split, image_size), n))


def _render(objects: tuple[ShapeObject, ...], size: int, rng: np.random.Generator) -> Image.Image:
    noise = rng.integers(-NOISE, NOISE + 1, size=(size, size, 3))
    image = Image.fromarray((BACKGROUND + noise).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for o in objects:
        r = cell * (0.42 if o.size == "large" else 0.25)
        slack = cell / 2 - r - 1
        row, col = divmod(o.cell, 3)
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        draw_shape(draw, o.shape, cx, cy, r, COLORS[o.color])
    return image


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = 0.85 * r
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    elif shape == "cross":
        t = 0.3 * r
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


# --- Parquet shards -------------------------------------------------------------------------

SHARD_SCHEMA = pa.schema(
    [("id", pa.string()), ("image", pa.binary()), ("instruction", pa.string()), ("reference", pa.string())]
)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def scene_rows(scenes: Iterable[Scene], prefix: str, vqa: bool = False) -> Iterator[dict]:
    """Shard rows: one caption row per scene, plus one row per question when `vqa`."""
    for i, scene in enumerate(scenes):
        image = png_bytes(scene.image)
        yield {"id": f"{prefix}-{i:06d}", "image": image,
               "instruction": CAPTION_INSTRUCTION, "reference": scene.caption}
        if vqa:
            for j, (question, answer) in enumerate(scene.qa):
                yield {"id": f"{prefix}-{i:06d}-q{j}", "image": image,
                       "instruction": question, "reference": answer}


def write_shards(
    path: str | Path,
    n: int,
    rows_per_shard: int = 1000,
    seed: int = 0,
    split: str = "test",
    vqa: bool = False,
    image_size: int = IMAGE_SIZE,
    stream: Iterator[Scene] | None = None,
) -> list[str]:
    """Write `n` scenes as Parquet shards `{split}-00000.parquet`, ... under `path`: from `stream`
    (e.g. demo-v2's `shapes_v2.iter_detailed_scenes(seed, split)`), by default the v1 scenes of
    (seed, split)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    scenes = islice(stream if stream is not None else iter_scenes(seed, split, image_size), n)
    rows = scene_rows(scenes, prefix=f"{split}-{seed}", vqa=vqa)
    files = []
    while chunk := list(islice(rows, rows_per_shard)):
        file = out / f"{split}-{len(files):05d}.parquet"
        pq.write_table(pa.Table.from_pylist(chunk, schema=SHARD_SCHEMA), file)
        files.append(str(file))
    return files


# --- Scoring --------------------------------------------------------------------------------

_OBJECT_RE = re.compile(
    r"\ban? (small|large) ({colors}) ({shapes}) (?:at|in) the ({cells})\b".format(
        colors="|".join(COLORS), shapes="|".join(SHAPES), cells="|".join(CELLS)
    )
)


def normalize(text: str) -> str:
    """Lower case, single spaces, no final period."""
    return " ".join(text.lower().split()).rstrip(".").strip()


def parse_caption(text: str) -> set[ShapeObject]:
    """The objects a caption describes; phrases that do not parse are skipped."""
    return {
        ShapeObject(cell=CELLS.index(cell), shape=shape, color=color, size=size)
        for size, color, shape, cell in _OBJECT_RE.findall(normalize(text))
    }


def caption_exact_match(pred: str, ref: str) -> bool:
    return normalize(pred) == normalize(ref)


def object_f1(pred: str, ref: str) -> float:
    """F1 between the (shape, colour, size, cell) objects of two captions."""
    p, r = parse_caption(pred), parse_caption(ref)
    if not p and not r:
        return 1.0
    return 2 * len(p & r) / (len(p) + len(r))


def answer_match(pred: str, ref: str) -> bool:
    return normalize(pred) == normalize(ref)
