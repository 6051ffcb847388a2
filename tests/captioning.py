"""Shared by the captioning tests: a tiny saved model, an input with every kind of bad row, the
job's read and prepare stages run without Ray, and reading a job's output back."""

import io
import json
import re
import secrets
import tarfile

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from elastic_ray.models.synthetic import random_llava
from elastic_ray.pipeline.actor import OUTPUT_SCHEMA
from elastic_ray.pipeline.job import CaptionJob
from elastic_ray.pipeline.prepare import PREPARED_SCHEMA, prepare
from elastic_ray.pipeline.reader import read_rows
from elastic_ray.pipeline.run import check


def ray_env() -> dict:
    """Environment for a test cluster and its clients: token auth on with a fresh token, and Ray
    kept on loopback (it swaps 127.0.0.1 in an address for the machine's own address, which a
    sandbox may refuse connections to; this switch, meant for laptops, makes it keep 127.0.0.1).
    Ray reads these once, when it is imported."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


LONG_INSTRUCTION = "describe the image . " * 120  # 480 words: over the tiny model's 272-token prompt limit
MAX_PIXELS = 1_000_000


def save_tiny_model(path) -> str:
    model, processor = random_llava()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def png(seed: int, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) if mode == "RGB" \
        else Image.new(mode, size)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def bad_rows() -> list[tuple[dict, str]]:
    """(row, expected error regex; None for a good row) pairs covering every bad-row kind."""
    truncated = png(1)
    return [
        ({"id": "good-default", "image": png(2), "instruction": None}, None),
        ({"id": "good-custom", "image": png(3), "instruction": "what color is the shape ?"}, None),
        ({"id": "truncated", "image": truncated[: len(truncated) // 2], "instruction": None}, "truncated"),
        ({"id": "empty-image", "image": b"", "instruction": None}, "empty image"),
        ({"id": "no-image", "image": None, "instruction": None}, "missing image"),
        ({"id": "garbage", "image": b"GIF89a but not really", "instruction": None}, "undecodable"),
        ({"id": "bomb", "image": png(0, (4000, 4000), mode="1"), "instruction": None},
         f"4000x4000 = 16000000 pixels, over the limit of {MAX_PIXELS}"),
        ({"id": "thin", "image": png(8, (200, 2)), "instruction": None}, "200x2: the aspect ratio is over 50"),
        ({"id": "empty-instruction", "image": png(4), "instruction": ""}, "empty instruction"),
        ({"id": "blank-instruction", "image": png(5), "instruction": "  \n"}, "empty instruction"),
        ({"id": "long-instruction", "image": png(6), "instruction": LONG_INSTRUCTION},
         "refused by the engine: .*over the engine's limit"),
    ]


def write_rows(path, rows: list[dict], schema: pa.Schema | None = None) -> None:
    schema = schema or pa.schema([("id", pa.string()), ("image", pa.binary()), ("instruction", pa.string())])
    with fsspec.open(str(path), "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), f)


def write_tar(path, members: list) -> None:
    """A tar shard of (name, bytes) members in order; a TarInfo is added as it is (a link, say)."""
    with tarfile.open(path, "w") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
                continue
            name, data = member
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _link(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def webdataset_shards(folder) -> dict[str, str | None]:
    """Two img2dataset-style shards and a broken one under `folder`; returns id -> expected error."""
    folder.mkdir(parents=True)
    write_tar(folder / "00000.tar", [
        ("000000001.jpg", png(1)), ("000000001.txt", b"an alt text"),
        ("000000002.png", png(2)), ("000000002.json", json.dumps({"instruction": "what shape ?"}).encode()),
        ("000000003.webp", png(3)), ("000000003.json", json.dumps({"caption": "no instruction"}).encode()),
        ("000000004.txt", b"text only"),
        ("000000005.jpg", b"not an image"),
        ("000000006.png", png(6)), ("000000006.json", b"{not json"),
        ("000000007.png", png(7)), ("000000007.json", json.dumps({"instruction": 5}).encode()),
        _link("000000008.png", "/etc/passwd"),
        ("000000009.png", png(9)), ("000000009.jpg", png(10)),
        (".png", png(11)),
    ])
    write_tar(folder / "00001.tar", [("000000010.png", png(12)), ("000000010.txt", b"x")])
    write_tar(folder / "00002.tar", [("000000011.png", png(13)), ("000000012.png", png(14))])
    whole = (folder / "00002.tar").read_bytes()  # cut inside the second member's header:
    (folder / "00002.tar").write_bytes(whole[:512 + 512 * ((len(png(13)) + 511) // 512) + 100])
    (folder / "00003.tar").write_bytes(b"not a tar at all" * 100)
    return {
        "000000001": None, "000000002": None, "000000003": None,
        "000000004": "missing image: no png\\|jpg.* member for key '000000004' \\(members: 000000004.txt\\)",
        "000000005": "undecodable image", "000000006": "000000006.json is not valid JSON",
        "000000007": "'instruction' in 000000007.json must be a string, got int",
        "000000008": "member 000000008.png is not a regular file",
        "000000009": "more than one image for key '000000009'",
        "00000.tar#9": None, "000000010": None, "000000011": None,
        "00002.tar#1": "tar shard unreadable after 1 samples",
        "00003.tar#0": "tar shard unreadable after 0 samples",
    }


def good_rows(n: int, prefix: str = "row") -> list[dict]:
    return [{"id": f"{prefix}-{i:03d}", "image": png(100 + i), "instruction": None} for i in range(n)]


def prepared(job: CaptionJob, done: tuple[str, ...] = ()) -> pa.Table:
    """The job's input through its read and prepare stages, here without Ray."""
    found = check(job)
    tables = [prepare(batch, job=job, found=found) for batch in read_rows(job, found, pa.array(done, pa.string()))]
    return pa.concat_tables(tables) if tables else PREPARED_SCHEMA.empty_table()


def write_output_file(path, ids: list[str]) -> None:
    """A Parquet file of captions with the job's columns, at `path`."""
    rows = [{"id": i, "caption": "a caption", "model": "demo"} for i in ids]
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), str(path))


def read_output(path: str, **storage_options) -> pa.Table:
    fs, root = fsspec.core.url_to_fs(path, **storage_options)
    files = sorted(f for f in fs.find(root) if f.endswith(".parquet"))
    tables = []
    for file in files:
        with fs.open(file, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables)


def readable_ids(path: str) -> list:
    """Ids in the output's files that have a Parquet footer (a killed run may leave one cut short)."""
    ids = []
    for file in sorted(f for f in fsspec.filesystem("file").find(path) if f.endswith(".parquet")):
        try:
            ids += pq.read_table(file, columns=["id"]).column("id").to_pylist()
        except pa.ArrowInvalid:
            continue
    return ids


def errors_by_id(table: pa.Table) -> dict:
    return dict(zip(table.column("id").to_pylist(), table.column("error").to_pylist()))


def check_errors(table: pa.Table, expected: list[tuple[dict, str]]) -> None:
    """Each expected row is in `table` once, flagged (null caption) or captioned as expected."""
    rows = {r["id"]: r for r in table.to_pylist()}
    for row, pattern in expected:
        got = rows[row["id"]]
        if pattern is None:
            assert got["error"] is None and got["caption"] is not None, got
            assert got["output_tokens"] > 0 and got["prompt_tokens"] > 0 and got["kv_bytes"] > 0, got
        else:
            assert got["caption"] is None and got["error"] and re.search(pattern, got["error"]), (pattern, got)
