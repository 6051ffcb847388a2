"""The caption job's inputs and resume, without Ray: files that are not regular or lead out of the
input, every file's schema checked before Ray starts, ids (derived for null ones, duplicates
found and kept apart on request), the formats (Parquet with Hugging Face image structs,
WebDataset tar shards, image folders), and which output files resume counts and deletes."""

import os
import re
import subprocess
import sys
from pathlib import Path

import fsspec
import pyarrow as pa
import pytest

from captioning import (
    errors_by_id, good_rows, png, prepared, webdataset_shards, write_output_file, write_rows, write_tar,
)
from conftest import special_files, within
from elastic_ray.data.shapes import CAPTION_INSTRUCTION
from elastic_ray.pipeline.job import CaptionJob, JobConfigError
from elastic_ray.pipeline.output import finished_ids
from elastic_ray.pipeline.run import check

ROWS = pa.schema([("id", pa.string()), ("image", pa.binary()), ("instruction", pa.string())])
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
OURS = "captions-" + "ab" * 16 + "-000000-{}.parquet"  # a name the job's CaptionFiles gives


def job_for(path, **settings) -> CaptionJob:
    return CaptionJob(input=str(path), output=str(Path(path).parent / "out"), **settings)


# --- Files that are not regular, or lead out of the input -------------------------------------


def test_an_image_folder_reads_regular_files_only_each_refusal_a_row_error(tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "in" / name).write_bytes(png(1))
    (tmp_path / "secret.png").write_bytes(png(2))
    with special_files(tmp_path / "in", tmp_path / "secret.png") as refused:
        errors = errors_by_id(within(30, prepared, job_for(tmp_path / "in")))
    listed = {name: message for name, message in refused.items() if name != "folder.png"}  # a folder is walked
    assert sorted(errors) == sorted(["a.png", "b.png", *listed])
    assert errors["a.png"] is None and errors["b.png"] is None
    for name, message in listed.items():
        assert errors[name] and message in errors[name], (name, errors[name])


def test_image_paths_read_regular_files_only_each_refusal_a_row_error(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(png(1))
    (tmp_path / "secret.png").write_bytes(png(2))
    with special_files(tmp_path / "in", tmp_path / "secret.png") as refused:
        names = ["a.png", *refused]
        schema = pa.schema([("id", pa.string()), ("path", pa.string())])
        write_rows(tmp_path / "in" / "rows.parquet", [{"id": n, "path": n} for n in names], schema)
        errors = errors_by_id(within(30, prepared, job_for(tmp_path / "in", image_path_column="path")))
    assert errors.pop("a.png") is None
    assert {name: message in (errors[name] or "") for name, message in refused.items()} \
        == dict.fromkeys(refused, True), errors


@pytest.mark.parametrize("shard", ["bad.parquet", "bad.tar"])
def test_a_shard_that_is_not_a_regular_file_inside_the_input_is_refused_before_ray(tmp_path, shard):
    (tmp_path / "in").mkdir()
    write_rows(tmp_path / "in" / "good.parquet", good_rows(2)) if shard.endswith(".parquet") \
        else write_tar(tmp_path / "in" / "good.tar", [("k.png", png(1))])
    os.mkfifo(tmp_path / "in" / shard)
    with pytest.raises(JobConfigError, match=f"input file refused: .*{shard} is a FIFO, not a regular file"):
        within(30, check, job_for(tmp_path / "in"))
    os.unlink(tmp_path / "in" / shard)
    write_rows(tmp_path / "elsewhere.parquet", good_rows(2))
    write_tar(tmp_path / "elsewhere.tar", [("k.png", png(1))])
    (tmp_path / "in" / shard).symlink_to(tmp_path / ("elsewhere" + Path(shard).suffix))
    with pytest.raises(JobConfigError, match=f"input file refused: .*{shard} resolves to .*elsewhere.* outside"):
        check(job_for(tmp_path / "in"))


# --- Every file's schema against the first's, before Ray ---------------------------------------


@pytest.mark.parametrize("first, second, message", [
    ([("id", pa.int64()), ("image", pa.binary())], [("id", pa.string()), ("image", pa.binary())],
     "--id-column: column 'id' in .*/b.parquet is string, but int64 in .*/a.parquet"),
    ([("id", pa.string()), ("image", pa.binary())], [("key", pa.string()), ("image", pa.binary())],
     "--id-column: no column 'id' in .*/b.parquet \\(the first file, .*/a.parquet, has it\\)"),
    ([("id", pa.string()), ("image", pa.binary())], [("id", pa.string()), ("image", HF_IMAGE)],
     "--image-column: column 'image' in .*/b.parquet is struct<.*>, but binary in .*/a.parquet"),
    ([("id", pa.string()), ("image", pa.binary()), ("instruction", pa.string())],
     [("id", pa.string()), ("image", pa.binary())], "--instruction-column: no column 'instruction' in .*/b.parquet"),
    ([("id", pa.string()), ("image", pa.binary())], [("id", pa.string()), ("image", pa.binary()),
                                                      ("instruction", pa.string())],
     "--instruction-column: .*/b.parquet has an 'instruction' column but the first file, .*/a.parquet, has none"),
])
def test_every_file_is_checked_against_the_first_naming_the_file_and_column(tmp_path, first, second, message):
    write_rows(tmp_path / "in" / "a.parquet", [], pa.schema(first))
    write_rows(tmp_path / "in" / "b.parquet", [], pa.schema(second))
    with pytest.raises(JobConfigError, match=message):
        check(job_for(tmp_path / "in"))


def test_an_all_null_column_matches_any_kind(tmp_path):
    write_rows(tmp_path / "in" / "a.parquet", [{"id": None, "image": png(1)}], pa.schema([("id", pa.null()),
                                                                                          ("image", pa.binary())]))
    write_rows(tmp_path / "in" / "b.parquet", [{"id": 7, "image": png(2)}], pa.schema([("id", pa.int64()),
                                                                                       ("image", pa.binary())]))
    assert prepared(job_for(tmp_path / "in")).column("id").to_pylist() == ["a.parquet#0", "7"]


@pytest.mark.slow
def test_the_cli_exits_2_naming_the_file_and_column_before_ray(tmp_path):
    write_rows(tmp_path / "in" / "a.parquet", good_rows(2))
    write_rows(tmp_path / "in" / "b.parquet", [{"id": 3, "image": png(3)}],
               pa.schema([("id", pa.int64()), ("image", pa.binary()), ("instruction", pa.string())]))
    result = subprocess.run([sys.executable, "jobs/caption.py", "--input", str(tmp_path / "in"), "--output",
                             str(tmp_path / "out")], capture_output=True, text=True, cwd=Path(__file__).parents[1],
                            timeout=120)
    assert result.returncode == 2
    assert f"--id-column: column 'id' in {tmp_path}/in/b.parquet is int64, but string in {tmp_path}/in/a.parquet" \
        in result.stderr
    assert "Ray" not in result.stderr + result.stdout and not (tmp_path / "out").exists()


# --- Ids ---------------------------------------------------------------------------------------


def test_rows_without_an_id_get_their_file_and_row(tmp_path):
    write_rows(tmp_path / "in" / "a.parquet", [{"id": "x", "image": png(1)}, {"id": None, "image": png(2)},
                                               {"id": None, "image": b"broken"}])
    write_rows(tmp_path / "in" / "sub" / "b.parquet", [{"id": None, "image": png(3)}])
    job = job_for(tmp_path / "in")
    table = prepared(job)
    assert table.column("id").to_pylist() == ["x", "a.parquet#1", "a.parquet#2", "sub/b.parquet#0"]
    assert table.column("error").to_pylist()[:2] == [None, None]  # captioned like any row
    assert prepared(job, done=("a.parquet#1", "sub/b.parquet#0")).column("id").to_pylist() == ["x", "a.parquet#2"]


def test_integer_ids_are_read_as_strings(tmp_path):
    schema = pa.schema([("id", pa.int64()), ("image", pa.binary())])
    write_rows(tmp_path / "in.parquet", [{"id": 10, "image": png(1)}, {"id": None, "image": png(2)}], schema)
    assert prepared(job_for(tmp_path / "in.parquet")).column("id").to_pylist() == ["10", "in.parquet#1"]


def test_duplicate_ids_are_refused_before_ray_with_examples(tmp_path):
    write_rows(tmp_path / "in" / "a.parquet", good_rows(3))
    write_rows(tmp_path / "in" / "b.parquet", good_rows(2) + [{"id": "row-000", "image": png(9)}])
    with pytest.raises(JobConfigError, match="2 ids occur more than once .*'row-000' in a.parquet row 0, "
                                             "b.parquet row 0, b.parquet row 2; 'row-001' in a.parquet row 1, "
                                             "b.parquet row 1.*--allow-duplicate-ids"):
        check(job_for(tmp_path / "in"))


def test_allowed_duplicates_keep_their_first_id_and_later_ones_get_file_and_row(tmp_path):
    write_rows(tmp_path / "in" / "a.parquet", good_rows(3))
    write_rows(tmp_path / "in" / "b.parquet", good_rows(2) + [{"id": "row-000", "image": png(9)}])
    job = job_for(tmp_path / "in", allow_duplicate_ids=True)
    assert check(job).rows == 6
    assert prepared(job).column("id").to_pylist() == [
        "row-000", "row-001", "row-002", "row-000#b.parquet#0", "row-001#b.parquet#1", "row-000#b.parquet#2"]


def test_a_null_id_derived_like_an_existing_id_is_a_duplicate(tmp_path):
    write_rows(tmp_path / "in.parquet", [{"id": "in.parquet#1", "image": png(1)}, {"id": None, "image": png(2)}])
    with pytest.raises(JobConfigError, match="1 ids occur more than once"):
        check(job_for(tmp_path / "in.parquet"))


# --- Formats -----------------------------------------------------------------------------------


def test_hugging_face_image_structs_are_read(tmp_path):
    (tmp_path / "in" / "pictures").mkdir(parents=True)
    (tmp_path / "in" / "pictures" / "p.png").write_bytes(png(4))
    rows = [{"id": "bytes", "image": {"bytes": png(1), "path": "ignored.png"}},
            {"id": "path", "image": {"bytes": None, "path": "pictures/p.png"}},
            {"id": "neither", "image": {"bytes": None, "path": None}},
            {"id": "null", "image": None},
            {"id": "outside", "image": {"bytes": None, "path": "../secret.png"}}]
    write_rows(tmp_path / "in" / "train.parquet", rows, pa.schema([("id", pa.string()), ("image", HF_IMAGE)]))
    errors = errors_by_id(prepared(job_for(tmp_path / "in")))
    assert errors["bytes"] is None and errors["path"] is None
    assert errors["neither"] == "missing image" and errors["null"] == "missing image"
    assert "outside the allowed locations" in errors["outside"]


def test_webdataset_shards_each_bad_member_a_flagged_row(tmp_path):
    expected = webdataset_shards(tmp_path / "in")
    job = job_for(tmp_path / "in")
    found = check(job)
    assert (found.format, found.rows) == ("webdataset", len(expected))
    table = prepared(job)
    errors = errors_by_id(table)
    assert sorted(errors) == sorted(expected)
    for key, pattern in expected.items():
        assert (errors[key] is None) if pattern is None else re.search(pattern, errors[key] or ""), (key, errors[key])
    prompts = dict(zip(table.column("id").to_pylist(), table.column("prompt").to_pylist()))
    assert prompts["000000002"] == "what shape ?" and prompts["000000001"] == CAPTION_INSTRUCTION
    assert prompts["000000003"] == CAPTION_INSTRUCTION
    assert prepared(job, done=("000000001", "00000.tar#9")).num_rows == len(expected) - 2


def test_the_input_format_is_detected_or_chosen(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(png(1))
    write_tar(tmp_path / "in" / "s.tar", [("k.png", png(2))])
    assert check(job_for(tmp_path / "in")).format == "webdataset"
    assert check(job_for(tmp_path / "in", input_format="images")).rows == 1
    write_rows(tmp_path / "in" / "rows.parquet", good_rows(2))
    assert check(job_for(tmp_path / "in")).format == "parquet"
    with pytest.raises(JobConfigError, match="--input-format must be auto or one of parquet, images, webdataset"):
        check(job_for(tmp_path / "in", input_format="csv"))
    with pytest.raises(JobConfigError, match="no webdataset files \\(.tar\\)"):
        check(job_for(tmp_path / "in" / "a.png", input_format="webdataset"))


def test_duplicate_keys_across_tar_shards_are_found(tmp_path):
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "0.tar", [("k.png", png(1))])
    write_tar(tmp_path / "in" / "1.tar", [("k.png", png(2))])
    with pytest.raises(JobConfigError, match="'k' in 0.tar row 0, 1.tar row 0"):
        check(job_for(tmp_path / "in"))
    assert prepared(job_for(tmp_path / "in", allow_duplicate_ids=True)).column("id").to_pylist() == ["k", "k#1.tar#0"]


# --- Resume: which output files count, which are deleted ----------------------------------------


def test_resume_counts_and_deletes_only_the_jobs_own_files(tmp_path):
    write_output_file(tmp_path / OURS.format(0), ["a", "b"])
    data = (tmp_path / OURS.format(0)).read_bytes()
    (tmp_path / OURS.format(1)).write_bytes(data[: len(data) // 2])  # ours, cut short by a kill
    write_output_file(tmp_path / "someone-elses.parquet", ["c"])  # complete, even with our columns
    (tmp_path / "notes.parquet").write_bytes(b"not parquet")  # unreadable, but not ours
    write_rows(tmp_path / OURS.format(2), good_rows(1))  # named like ours, other columns
    (tmp_path / "sub").mkdir()
    write_output_file(tmp_path / "sub" / OURS.format(3), ["d"])  # ours only directly under the output
    with pytest.warns(UserWarning, match="4 files in the output were not written by this job"):
        ids = finished_ids(fsspec.filesystem("file"), str(tmp_path))
    assert sorted(ids.to_pylist()) == ["a", "b"]
    assert sorted(p.name for p in tmp_path.rglob("*.parquet")) == sorted(
        [OURS.format(0), "someone-elses.parquet", "notes.parquet", OURS.format(2), OURS.format(3)])
