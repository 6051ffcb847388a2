"""The CPU stage: decode and validate each row's image and resolve its instruction, so a bad row
becomes an error row before it reaches a caption actor."""

import pyarrow as pa
from PIL import Image

from elastic_ray.data.images import ImageError, ImageSource, decode_image
from elastic_ray.pipeline.job import CaptionJob

PREPARED_SCHEMA = pa.schema([
    ("id", pa.string()), ("pixels", pa.large_binary()), ("width", pa.int32()), ("height", pa.int32()),
    ("prompt", pa.string()), ("error", pa.string()),
])


def prepare(batch: pa.Table, *, job: CaptionJob, found) -> pa.Table:
    """CPU stage: one prepared row (RGB pixels and prompt, or an error) per row the reader yields
    (see `reader.ROW_SCHEMA`)."""
    source = ImageSource(allowed=(found.location, *job.allow_images_from), root=found.location,
                         storage_options=job.storage_options)
    rows = [_prepare_row(row, job, source) for row in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA)


def _prepare_row(read: dict, job: CaptionJob, source: ImageSource) -> dict:
    row = {"id": read["id"], "pixels": None, "width": None, "height": None, "prompt": None, "error": read["error"]}
    if row["error"] is not None:
        return row
    instruction = job.instruction if read["instruction"] is None else read["instruction"]
    if not instruction.strip():
        row["error"] = "empty instruction"
        return row
    try:
        if read["image_path"] is not None:
            picture = source.load(read["image_path"], job.max_pixels)
        else:
            picture = decode_image(read["image"], job.max_pixels)
    except ImageError as e:
        row["error"] = str(e)
        return row
    row.update(pixels=picture.tobytes(), width=picture.width, height=picture.height, prompt=instruction)
    return row


def to_request(row: dict) -> dict:
    """A prepared row as an engine request."""
    return {"id": row["id"], "image": Image.frombytes("RGB", (row["width"], row["height"]), row["pixels"]),
            "prompt": row["prompt"]}
