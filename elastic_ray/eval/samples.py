"""What an evaluation runs on: (image, instruction, reference) samples, from shapes or Parquet."""

import random
from dataclasses import dataclass

import pyarrow.parquet as pq
from PIL import Image

from elastic_ray.data.images import decode_image
from elastic_ray.data.shapes import CAPTION_INSTRUCTION, make_scenes
from elastic_ray.data.shapes_v2 import make_detailed_scenes

SCENES = {"demo": make_scenes, "demo-v2": make_detailed_scenes}  # a demo model's own test scenes


@dataclass(frozen=True)
class Sample:
    id: str
    image: Image.Image
    instruction: str
    reference: str
    kind: str  # "caption", "description", "vqa", or "reference" for a data set with no task scorer


def shapes_samples(n: int, seed: int = 0, scenes: str = "demo", split: str = "test") -> list[Sample]:
    """`n` scenes of a split (the test split by default) of a demo model's data (`SCENES`), each as
    its long samples (a caption; with demo-v2 also a multi-sentence description) and as one of its
    questions."""
    if scenes not in SCENES:
        raise ValueError(f"scenes must be one of {sorted(SCENES)}, got {scenes!r}")
    rng = random.Random(seed)
    samples = []
    for i, scene in enumerate(SCENES[scenes](n, seed=seed, split=split)):
        question, answer = rng.choice(scene.qa)
        for instruction, reference in scene.long_targets:
            kind = "caption" if instruction == CAPTION_INSTRUCTION else "description"
            samples.append(Sample(f"{i}-{kind}", scene.image, instruction, reference, kind))
        samples.append(Sample(f"{i}-vqa", scene.image, question, answer, "vqa"))
    return samples


def parquet_samples(path: str, n: int | None = None, *, offset: int = 0, kind: str = "reference",
                    id_column: str = "id", image_column: str = "image", instruction_column: str = "instruction",
                    reference_column: str = "reference") -> list[Sample]:
    """Rows [offset, offset + n) of a Parquet file or directory with encoded images, instructions and
    reference answers; `kind` "caption" or "vqa" when the references are shapes ground truth."""
    table = pq.read_table(path)
    missing = [c for c in (id_column, image_column, instruction_column, reference_column) if c not in table.column_names]
    if missing:
        raise ValueError(f"{path} has no column(s) {missing}; it has {table.column_names}")
    rows = table.slice(offset, n).to_pylist()
    if not rows:
        raise ValueError(f"{path} has no rows from row {offset} on (it has {table.num_rows})")
    return [Sample(str(r[id_column]), decode_image(r[image_column]), r[instruction_column], r[reference_column], kind)
            for r in rows]
