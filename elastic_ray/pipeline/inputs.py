"""What the job reads, checked before Ray starts: the input's format and files, every Parquet
file's schema against the first's, every row's id (once, unless duplicates are allowed), the row
count, and the pieces the read tasks take.

Formats: Parquet shards; a folder of images; WebDataset tar shards (img2dataset's layout).
Ids: a row's id as a string; a row with none gets `<file>#<row>` (its file under the input and
its 0-based row, or sample, in that file); with `--allow-duplicate-ids`, every occurrence of an
id after its first (in file and row order) becomes `<id>#<file>#<row>`.
"""

import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from elastic_ray.data import webdataset
from elastic_ray.data.images import IMAGE_EXTENSIONS
from elastic_ray.data.local_files import FileRefused, open_regular
from elastic_ray.pipeline.job import INPUT_FORMATS, CaptionJob, JobConfigError

EXTENSIONS = {"parquet": (".parquet",), "webdataset": (".tar",), "images": IMAGE_EXTENSIONS}
# A read task takes whole Parquet row groups up to about this many uncompressed bytes, one tar
# shard, or this many image files.
PIECE_BYTES = 64 * 2**20
PIECE_FILES = 256
# Files whose footers or headers are read at once: on s3:// each is a round trip.
INSPECT_THREADS = 16
DUPLICATE_EXAMPLES = 5


@dataclass(frozen=True)
class Layout:
    """How a read task turns the input's records into rows: what a task needs besides its piece.

    `image_kind` is "binary" (encoded bytes), "struct" (Hugging Face's {"bytes", "path"}) or
    "path" (a path or URI); for tar shards `instruction` names the JSON field, for Parquet the column.
    """

    format: str
    location: str
    id_column: str | None = None
    image_column: str | None = None
    image_kind: str | None = None
    instruction: str | None = None


@dataclass(frozen=True)
class Piece:
    """What one read task reads: `rows` rows of `file` from row `start` (Parquet row groups
    `row_groups`; tar samples), or the image files `paths`. `source` is the file under the input,
    which ids derived from a row's position start with; `renames` maps a row to the id a
    duplicate takes."""

    file: str
    source: str
    start: int
    rows: int
    bytes: int | None = None
    row_groups: tuple[int, ...] = ()
    paths: tuple[str, ...] = ()
    renames: tuple[tuple[int, str], ...] = ()


@dataclass
class Input:
    """A checked input. `root` and `files` are paths on the input's filesystem (no protocol);
    `location` is the folder holding the input as a URL (or a local path), under which relative
    image paths resolve."""

    format: str
    root: str
    location: str
    files: list[str]
    rows: int
    layout: Layout
    pieces: list[Piece] = field(default_factory=list)

    @property
    def instruction_column(self) -> str | None:
        return self.layout.instruction


def inspect_input(job: CaptionJob) -> Input:
    """The checked input; a bad input raises JobConfigError naming the file and the column."""
    fs, root = job.filesystem(job.input)
    fs.invalidate_cache(root)
    if not fs.exists(root):
        raise JobConfigError(f"input not found: {job.input}")
    folder = fs.isdir(root)
    files = sorted(fs.find(root)) if folder else [root]
    base = root if folder else posixpath.dirname(root)
    location = f"{job.input.split('://', 1)[0]}://{base}" if "://" in job.input else base
    kind = _input_format(job, files)
    files = [f for f in files if f.lower().endswith(EXTENSIONS[kind])]
    if not files:
        raise JobConfigError(f"no {kind} files ({', '.join(EXTENSIONS[kind])}) under {job.input}")
    if kind != "parquet" and job.image_path_column:
        raise JobConfigError(f"--image-path-column applies to Parquet input, but {job.input} is read as {kind}")
    if kind == "images" and job.instruction_column:
        raise JobConfigError(f"--instruction-column applies to Parquet and WebDataset input, but {job.input} holds "
                             "image files")
    shards = Shards(fs, root, base)
    if kind == "parquet":
        return _inspect_parquet(job, shards, location, files)
    if kind == "webdataset":
        return _inspect_webdataset(job, shards, location, files)
    layout = Layout("images", location)
    pieces = [Piece(base, "", start, len(chunk), paths=tuple(chunk))
              for start in range(0, len(files), PIECE_FILES) for chunk in [files[start:start + PIECE_FILES]]]
    return Input("images", base, location, files, len(files), layout, pieces)


def _input_format(job: CaptionJob, files: list[str]) -> str:
    if job.input_format != "auto":
        return job.input_format
    for kind in ("parquet", "webdataset", "images"):  # a Parquet folder may hold the images its paths name
        if any(f.lower().endswith(EXTENSIONS[kind]) for f in files):
            return kind
    extensions = sorted({e for kind in INPUT_FORMATS for e in EXTENSIONS[kind]})
    raise JobConfigError(f"no input files ({', '.join(extensions)}) under {job.input}")


@dataclass(frozen=True)
class Shards:
    """Opens the input's shard files: on a local disk only regular files under the input once
    symlinks are resolved (see `local_files`), so a FIFO or a link out of the folder is refused."""

    fs: object
    root: str
    base: str

    @classmethod
    def of(cls, job: CaptionJob, found: "Input") -> "Shards":
        fs, root = job.filesystem(job.input)
        return cls(fs, root, found.root)

    def open(self, path: str):
        if isinstance(self.fs, LocalFileSystem):
            return open_regular(path, [self.root])
        return self.fs.open(path, "rb")

    def source(self, path: str) -> str:
        return posixpath.relpath(path, self.base)

    def each(self, read, files: list[str], what: str) -> list:
        """`read(open file)` for every file, a few at a time; a file that fails is named."""
        def one(path):
            try:
                with self.open(path) as f:
                    return read(f)
            except FileNotFoundError as e:
                raise JobConfigError(f"input file vanished: {path}") from e
            except FileRefused as e:
                raise JobConfigError(f"input file refused: {e}") from e
            except (OSError, pa.ArrowException) as e:
                raise JobConfigError(f"cannot read the {what} {path}: {e}") from e
        with ThreadPoolExecutor(INSPECT_THREADS) as pool:
            return list(pool.map(one, files))


# --- Parquet ---------------------------------------------------------------------------------


def _type_kind(t: pa.DataType) -> str:
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return "binary"
    if pa.types.is_struct(t) and {t.field(i).name for i in range(t.num_fields)} & {"bytes", "path"}:
        parts = {t.field(i).name: _type_kind(t.field(i).type) for i in range(t.num_fields)}
        if parts.get("bytes", "binary") in ("binary", "null") and parts.get("path", "string") in ("string", "null"):
            return "struct"
    return str(t)


def _columns(job: CaptionJob, first: pa.Schema) -> list[tuple[str, str, tuple[str, ...]]]:
    """(flag, column, kinds it may hold) for every column the job reads, as the first file decides."""
    image = ("--image-path-column", job.image_path_column, ("string",)) if job.image_path_column \
        else ("--image-column", job.image_column, ("binary", "struct"))
    columns = [("--id-column", job.id_column, ("string", "integer")), image]
    instruction = job.instruction_column or ("instruction" if "instruction" in first.names else None)
    if instruction is not None:
        columns.append(("--instruction-column", instruction, ("string",)))
    return columns


def _check_schemas(job: CaptionJob, files: list[str], schemas: list[pa.Schema]) -> list[tuple[str, str]]:
    """Every file against the first: the job's columns present, each of a kind it may hold and of
    the same kind in every file (an all-null column matches any). Returns (column, kind) pairs."""
    found = []
    for flag, column, allowed in _columns(job, schemas[0]):
        reference = None
        for path, schema in zip(files, schemas):
            if column not in schema.names:
                where = "" if path == files[0] else f" (the first file, {files[0]}, has it)"
                raise JobConfigError(f"{flag}: no column {column!r} in {path}{where}; its columns: {schema.names}")
            t = schema.field(column).type
            kind = _type_kind(t)
            if kind == "null":
                continue
            if kind not in allowed:
                hint = "; for image paths pass --image-path-column" if flag == "--image-column" and kind == "string" \
                    else ""
                raise JobConfigError(f"{flag}: column {column!r} in {path} is {t}, not {' or '.join(allowed)}{hint}")
            if reference is None:
                reference = (path, t, kind)
            elif kind != reference[2]:
                raise JobConfigError(f"{flag}: column {column!r} in {path} is {t}, but {reference[1]} in "
                                     f"{reference[0]}: every file must hold the same kind")
        found.append((column, reference[2] if reference else "null"))
    later = next((p for p, schema in zip(files, schemas) if "instruction" in schema.names), None)
    if len(found) == 2 and later is not None:
        raise JobConfigError(f"--instruction-column: {later} has an 'instruction' column but the first file, "
                             f"{files[0]}, has none: name it with --instruction-column, or have it in every file")
    return found


def _inspect_parquet(job: CaptionJob, shards: Shards, location: str, files: list[str]) -> Input:
    footers = shards.each(pq.read_metadata, files, "Parquet file")
    kinds = _check_schemas(job, files, [f.schema.to_arrow_schema() for f in footers])
    (id_column, _), (image_column, image_kind) = kinds[:2]
    layout = Layout("parquet", location, id_column, image_column,
                    "path" if job.image_path_column else ("struct" if image_kind == "struct" else "binary"),
                    kinds[2][0] if len(kinds) > 2 else None)
    sources = [shards.source(f) for f in files]
    ids = shards.each(lambda f: pq.read_table(f, columns=[id_column]).column(0), files, "Parquet file")
    renames = _renames(job, sources, [row_ids(column, source) for column, source in zip(ids, sources)])
    pieces = []
    for path, source, footer in zip(files, sources, footers):
        pieces += _parquet_pieces(path, source, footer, renames.get(source, {}))
    return Input("parquet", shards.base, location, files, sum(f.num_rows for f in footers), layout, pieces)


def _parquet_pieces(path: str, source: str, footer: pq.FileMetaData, renames: dict[int, str]) -> list[Piece]:
    """Consecutive row groups up to PIECE_BYTES (at least one) per piece."""
    pieces, groups, start, rows, size = [], [], 0, 0, 0
    for i in range(footer.num_row_groups + 1):
        group = footer.row_group(i) if i < footer.num_row_groups else None
        if groups and (group is None or size + group.total_byte_size > PIECE_BYTES):
            moved = tuple((row, new) for row, new in sorted(renames.items()) if start <= row < start + rows)
            pieces.append(Piece(path, source, start, rows, size, tuple(groups), renames=moved))
            groups, start, rows, size = [], start + rows, 0, 0
        if group is not None:
            groups.append(i)
            rows, size = rows + group.num_rows, size + group.total_byte_size
    return pieces


# --- WebDataset tar shards -------------------------------------------------------------------


def _inspect_webdataset(job: CaptionJob, shards: Shards, location: str, files: list[str]) -> Input:
    keys = shards.each(lambda f: webdataset.keys(webdataset.index(f)[1]), files, "tar shard")
    sources = [shards.source(f) for f in files]
    renames = _renames(job, sources, [row_ids(k, source) for k, source in zip(keys, sources)])
    pieces = [Piece(path, source, 0, len(k), renames=tuple(sorted(renames.get(source, {}).items())))
              for path, source, k in zip(files, sources, keys)]
    layout = Layout("webdataset", location, instruction=job.instruction_column or "instruction")
    return Input("webdataset", shards.base, location, files, sum(len(k) for k in keys), layout, pieces)


# --- Ids -------------------------------------------------------------------------------------


def row_ids(values: pa.Array, source: str, start: int = 0, renames: tuple[tuple[int, str], ...] = ()) -> pa.Array:
    """The ids of rows `start`, `start + 1`, ... of `source`: each value as a string; a null
    becomes `<source>#<row>`; `renames` (row, id) replace the ids of duplicates kept apart."""
    ids = pc.cast(values, pa.string()) if values.type != pa.string() else values
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    fixed = {start + i: None for i in np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))}
    fixed.update((row, new) for row, new in renames if start <= row < start + len(ids))
    if not fixed:
        return ids
    mask = np.zeros(len(ids), bool)
    mask[[row - start for row in fixed]] = True
    replacements = [f"{source}#{row}" if new is None else new for row, new in sorted(fixed.items())]
    return pc.replace_with_mask(ids, pa.array(mask), pa.array(replacements, pa.string()))


def _renames(job: CaptionJob, sources: list[str], ids: list[pa.Array]) -> dict[str, dict[int, str]]:
    """The ids of duplicates kept apart, by file and row; without --allow-duplicate-ids a
    duplicate raises JobConfigError with examples.

    One pass over the id column, by sorting: the ids in memory once, and once more in sorted order
    with their sort indices (their bytes plus 12 bytes a row), so time and memory grow with the
    id column alone, never with the images."""
    every = pa.chunked_array(ids, pa.string())
    if every.nbytes >= 2**31:  # sorted into one array, the ids need 64-bit offsets
        every = every.cast(pa.large_string())
    order = pc.sort_indices(every)
    ordered = every.take(order)
    same = pc.equal(ordered[1:], ordered[:-1]).to_numpy(zero_copy_only=False)  # ordered[i] == ordered[i + 1]
    if not same.any():
        return {}
    twins = np.flatnonzero(same)
    positions = np.sort(order.to_numpy()[np.union1d(twins, twins + 1)])  # in input order
    del order, ordered, same
    starts = np.cumsum([0] + [len(a) for a in ids])
    places: dict[str, list[tuple[str, int]]] = {}
    for position, value in zip(positions, every.take(pa.array(positions)).to_pylist()):
        f = int(np.searchsorted(starts, position, side="right")) - 1
        places.setdefault(value, []).append((sources[f], int(position - starts[f])))
    if not job.allow_duplicate_ids:
        examples = "; ".join(f"{value!r} in " + ", ".join(f"{s} row {r}" for s, r in where[:3])
                             for value, where in list(places.items())[:DUPLICATE_EXAMPLES])
        raise JobConfigError(f"{len(places)} ids occur more than once in {job.input} ({examples}); pass "
                             "--allow-duplicate-ids to caption each row, later occurrences as '<id>#<file>#<row>'")
    renames: dict[str, dict[int, str]] = {}
    for value, where in places.items():
        for source, row in where[1:]:
            renames.setdefault(source, {})[row] = f"{value}#{source}#{row}"
    new = pa.array([v for rows in renames.values() for v in rows.values()], every.type)
    clash = new.filter(pc.is_in(new, value_set=every))
    if len(clash):
        raise JobConfigError(f"--allow-duplicate-ids: the id {clash[0].as_py()!r} given to a duplicate is "
                             "already an id in the input")
    return renames
