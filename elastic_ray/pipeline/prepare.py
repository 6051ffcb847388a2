"""The CPU stages before the caption actors: decode and validate each row's image and resolve its
instruction (`prepare`), then run the model's processor on it and check the prompt's length
(`process`), so a bad row becomes an error row and the actors' engines get model inputs ready
to run.

Measured on the demo (README, The captioning job; `jobs/object_store_cost.py`): a processed row
carries 154 KB of tensors against a decoded row's 38 KB, which costs 0.09 ms more a row to put
in the object store (getting either is 0.007 ms a row on one node), while the actor makes its
requests in 0.14 ms a row from the tensors against 1.37 ms through the processor: the tensors
cost less to move than to compute beside the engine.
"""

import functools
import json

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from transformers import AutoConfig

from elastic_ray.data.images import ImageError, ImageSource, decode_image
from elastic_ray.models.loading import load_processor, resolve
from elastic_ray.models.prompts import PreparedRequest, prepare_request, prompt_limit
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


PROCESSED_SCHEMA = pa.schema([
    ("id", pa.string()), ("inputs", pa.large_binary()), ("prompt_tokens", pa.int32()), ("error", pa.string()),
])


@functools.cache
def processor_and_limit(model: str, max_tokens: int):
    """The model's processor and its engines' prompt limit, loaded once per worker process."""
    path = resolve(model)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    return load_processor(path, config.model_type), prompt_limit(config, max_tokens)


def process(batch: pa.Table, *, job: CaptionJob) -> pa.Table:
    """CPU stage: each good prepared row through the model's processor, packed for the caption actor
    (`unpack`); a prompt over the engine's limit becomes the row's error."""
    processor, limit = processor_and_limit(job.model, job.max_tokens)
    rows = []
    for row in batch.to_pylist():
        out = {"id": row["id"], "inputs": None, "prompt_tokens": None, "error": row["error"]}
        if row["error"] is None:
            try:
                prepared = prepare_request(processor, to_request(row), limit)
            except ValueError as e:
                out["error"] = f"refused by the engine: {e}"
            else:
                out.update(inputs=pack(prepared), prompt_tokens=prepared.prompt_tokens)
        rows.append(out)
    return pa.Table.from_pylist(rows, schema=PROCESSED_SCHEMA)


def pack(prepared: PreparedRequest) -> bytes:
    """A prepared request's tensors as bytes: a JSON header (name, dtype, shape each) after its
    4-byte length, then the arrays' bytes in that order. No pickle: the bytes are data only."""
    arrays = [(name, tensor.numpy()) for name, tensor in prepared.inputs.items()]
    header = json.dumps([[name, array.dtype.str, list(array.shape)] for name, array in arrays]).encode()
    return b"".join([len(header).to_bytes(4, "little"), header, *(array.tobytes() for _, array in arrays)])


def unpack(row: dict) -> PreparedRequest:
    """A processed row (`process`) as the engine's request."""
    data = bytearray(row["inputs"])  # writable, so the tensors can share its memory
    size = int.from_bytes(data[:4], "little")
    offset, tensors = 4 + size, {}
    for name, dtype, shape in json.loads(data[4:offset]):
        array = np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
        tensors[name] = torch.from_numpy(array)
        offset += array.nbytes
    return PreparedRequest(tensors, row["prompt_tokens"])
