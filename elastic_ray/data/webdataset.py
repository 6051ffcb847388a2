"""WebDataset tar shards as img2dataset writes them: consecutive members sharing a key
(`KEY.jpg`, `KEY.txt`, `KEY.json`, ...) form one sample; the key is the member's path up to the
first dot of its file name.

`index` opens a shard and reads its member headers only (seeking past the data), `load` one
sample's image and JSON. Nothing in a shard can fail the caller: a bad member becomes its sample's `error`,
and a shard unreadable from some point on ends with one sample whose key is None and whose
error says where it broke.
"""

import json
import posixpath
import tarfile
from dataclasses import dataclass, field

import pyarrow as pa

from elastic_ray.data.images import IMAGE_EXTENSIONS, MAX_BYTES

MAX_JSON_BYTES = 2**20
_IMAGE_EXTENSIONS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


@dataclass
class Sample:
    """One key's members, as found in the shard's headers."""

    key: str | None
    image: tarfile.TarInfo | None = None
    json: tarfile.TarInfo | None = None
    error: str | None = None
    members: list[str] = field(default_factory=list)


def split_name(name: str) -> tuple[str, str]:
    """A member's (key, extension): `dir/000123.seg.png` -> (`dir/000123`, `seg.png`)."""
    name = name.removeprefix("./")
    folder, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, extension.lower()


def index(fileobj) -> tuple[tarfile.TarFile | None, list[Sample]]:
    """The shard opened (None if it cannot be) and its samples in order, from the member headers
    alone. `fileobj` must be seekable."""
    samples: list[Sample] = []
    tar = None
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:")
        for member in tar:
            if member.isdir():
                continue
            key, extension = split_name(member.name)
            if not samples or samples[-1].key != key:
                samples.append(Sample(key))
            _add_member(samples[-1], member, extension)
        _check_end(fileobj, tar.offset)
    except (tarfile.TarError, OSError, EOFError, UnicodeError) as e:
        samples.append(Sample(None, error=f"tar shard unreadable after {len(samples)} samples: "
                                          f"{type(e).__name__}: {e}"))
    for sample in samples:
        if sample.error is None and sample.image is None:
            sample.error = f"missing image: no {'|'.join(_IMAGE_EXTENSIONS)} member for key {sample.key!r} " \
                           f"(members: {', '.join(sample.members)})"
    return tar, samples


def keys(samples: list[Sample]) -> pa.Array:
    """The samples' keys; None for a sample without one (an empty key, or the shard's break)."""
    return pa.array([s.key or None for s in samples], pa.string())


def _check_end(fileobj, offset: int) -> None:
    """tarfile ends quietly at a header it cannot parse; only zero blocks may follow the last member."""
    fileobj.seek(offset)
    while chunk := fileobj.read(2**16):
        if chunk.strip(b"\0"):
            raise tarfile.ReadError(f"no valid member header at byte {offset}")


def _add_member(sample: Sample, member: tarfile.TarInfo, extension: str) -> None:
    sample.members.append(member.name)
    if sample.error is not None:
        return
    if not member.isreg():
        sample.error = f"member {member.name} is not a regular file"
    elif extension in _IMAGE_EXTENSIONS:
        if sample.image is not None:
            sample.error = f"more than one image for key {sample.key!r}: {sample.image.name}, {member.name}"
        elif member.size > MAX_BYTES:
            sample.error = f"image member {member.name} is {member.size} bytes, over the limit of {MAX_BYTES}"
        else:
            sample.image = member
    elif extension == "json":
        if member.size > MAX_JSON_BYTES:
            sample.error = f"json member {member.name} is {member.size} bytes, over the limit of {MAX_JSON_BYTES}"
        else:
            sample.json = member


def load(tar: tarfile.TarFile, sample: Sample) -> tuple[bytes | None, dict, str | None]:
    """A sample's (image bytes, JSON object, error)."""
    if sample.error is not None:
        return None, {}, sample.error
    try:
        image = tar.extractfile(sample.image).read()
        meta = json.loads(tar.extractfile(sample.json).read()) if sample.json is not None else {}
    except (tarfile.TarError, OSError, EOFError) as e:
        return None, {}, f"cannot read the members of key {sample.key!r}: {type(e).__name__}: {e}"
    except ValueError as e:
        return None, {}, f"{sample.json.name} is not valid JSON: {e}"
    if not isinstance(meta, dict):
        return None, {}, f"{sample.json.name} holds a JSON {type(meta).__name__}, not an object"
    return image, meta, None
