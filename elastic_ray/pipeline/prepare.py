"""The CPU stage: decode and validate each row's image and resolve its instruction, so a bad row
becomes an error row before it reaches a caption actor."""

import posixpath

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from elastic_ray.data.images import ImageError, ImageSource, decode_image
from elastic_ray.pipeline.job import CaptionJob

PREPARED_SCHEMA = pa.schema([
    ("id", pa.string()), ("pixels", pa.large_binary()), ("width", pa.int32()), ("height", pa.int32()),
    ("prompt", pa.string()), ("error", pa.string()),
])


def prepare(batch: pa.Table, *, job: CaptionJob, found, done: pa.Array) -> pa.Table:
    """CPU stage: one prepared row (RGB pixels and prompt, or an error) per input row whose id is not in
    `done`; finished rows are dropped before any image is read."""
    source = ImageSource(allowed=(found.location, *job.allow_images_from), root=found.location,
                         storage_options=job.storage_options)
    if found.format == "images":
        ids = [posixpath.relpath(p, found.root) for p in batch.column("path").to_pylist()]
        images = batch.column("bytes").to_pylist()
        instructions = [None] * len(ids)
    else:
        ids = batch.column(job.id_column).to_pylist()
        images = batch.column(job.image_path_column or job.image_column).to_pylist()
        instructions = (batch.column(found.instruction_column).to_pylist() if found.instruction_column
                        else [None] * len(ids))
    text_ids = pa.array([None if i is None else str(i) for i in ids], pa.string())
    finished = pc.is_in(text_ids, value_set=done).to_pylist()
    rows = [_prepare_row(raw_id, image, instruction, job, source)
            for raw_id, image, instruction, skip in zip(ids, images, instructions, finished) if not skip]
    return pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA)


def _prepare_row(raw_id, image, instruction, job: CaptionJob, source: ImageSource) -> dict:
    row = {"id": None, "pixels": None, "width": None, "height": None, "prompt": None, "error": None}
    if raw_id is None:
        row["error"] = "missing id"
        return row
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        row["id"] = str(raw_id)
        row["error"] = f"id must be a string or an integer, got {type(raw_id).__name__}"
        return row
    row["id"] = str(raw_id)
    if instruction is None:
        instruction = job.instruction
    if not isinstance(instruction, str):
        row["error"] = f"instruction must be a string, got {type(instruction).__name__}"
        return row
    if not instruction.strip():
        row["error"] = "empty instruction"
        return row
    try:
        if job.image_path_column:
            picture = source.load(image, job.max_pixels)
        else:
            picture = decode_image(image, job.max_pixels)
    except ImageError as e:
        row["error"] = str(e)
        return row
    row.update(pixels=picture.tobytes(), width=picture.width, height=picture.height, prompt=instruction)
    return row


def to_request(row: dict) -> dict:
    """A prepared row as an engine request."""
    return {"id": row["id"], "image": Image.frombytes("RGB", (row["width"], row["height"]), row["pixels"]),
            "prompt": row["prompt"]}
