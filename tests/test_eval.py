"""Fidelity evaluation: the scores on hand-computed cases, teacher forcing, and a sweep end to end."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from elastic_ray.eval.metrics import perplexity, rouge_l, shapes_accuracy
from elastic_ray.eval.results import combine_seeds, write_results
from elastic_ray.eval.samples import parquet_samples, shapes_samples
from elastic_ray.eval.summary import targets
from elastic_ray.eval.sweep import Cell, answer_tokens, end_token, grid, run_cell, sweep, variant
from elastic_ray.models.prompts import build_prompt


def test_perplexity_is_corpus_level():
    # three tokens with probabilities 1/2, 1/4, 1/2: exp(mean NLL) = 2 ** (4/3), not a mean of per-sample PPLs
    assert perplexity([[math.log(0.5)], [math.log(0.25), math.log(0.5)]]) == pytest.approx(2 ** (4 / 3))
    with pytest.raises(ValueError):
        perplexity([[]])


def test_rouge_l_is_the_lcs_f1():
    # LCS("a b c d", "a c d e") = "a c d": precision 3/4, recall 3/4
    assert rouge_l(["a b c d"], ["a c d e"]) == pytest.approx(0.75)
    # LCS = 2 of a 2-word prediction and a 4-word reference: P = 1, R = 1/2, F = 2/3
    assert rouge_l(["red circle", "x"], ["a red big circle", "x"]) == pytest.approx((2 / 3 + 1) / 2)
    with pytest.raises(ValueError):
        rouge_l(["a"], [])


def test_shapes_accuracy_scores_captions_and_answers_separately():
    ref = "a large red circle at the top left and a small blue square in the center."
    scores = shapes_accuracy(
        ["caption", "caption", "vqa", "vqa"],
        [ref.upper(), "a large red circle at the top left.", "Red.", "blue"],
        [ref, ref, "red", "green"],
    )
    assert scores["caption_exact_match"] == 0.5 and scores["vqa_accuracy"] == 0.5
    assert scores["object_f1"] == pytest.approx((1 + 2 * (1 * 0.5) / 1.5) / 2)
    assert scores["accuracy"] == 0.5


def test_descriptions_are_scored_apart_and_count_toward_task_accuracy():
    description = "There is one object on a striped background. A small red circle is at the top left."
    scores = shapes_accuracy(["caption", "description", "description", "vqa"],
                             ["a small red circle at the top left.", description.lower(), "There is one object.", "no"],
                             ["a small red circle at the top left.", description, description, "red"])
    assert scores["description_exact_match"] == 0.5 and scores["caption_exact_match"] == 1.0
    assert scores["accuracy"] == 0.5  # 2 of 4 samples exact
    assert "description_exact_match" not in shapes_accuracy(["caption"], ["x"], ["y"])  # v1 samples: no column


def test_demo_v2_scenes_give_a_caption_a_description_and_a_question_each():
    from elastic_ray.data.shapes_v2 import DESCRIPTION_INSTRUCTION, parse_description

    samples = shapes_samples(3, seed=1, scenes="demo-v2")
    assert [s.kind for s in samples] == ["caption", "description", "vqa"] * 3
    assert all(s.image.size == (224, 224) for s in samples)
    descriptions = [s for s in samples if s.kind == "description"]
    assert all(s.instruction == DESCRIPTION_INSTRUCTION and len(s.reference.split()) > 15 for s in descriptions)
    assert all(parse_description(s.reference).objects for s in descriptions)
    assert [s.reference for s in shapes_samples(3, seed=1)] != [s.reference for s in samples[:6]]  # v1 differs
    assert [s.kind for s in shapes_samples(2)] == ["caption", "vqa"] * 2  # v1: as before
    with pytest.raises(ValueError, match="scenes must be one of"):
        shapes_samples(1, scenes="demo-v3")


def test_teacher_forced_logprobs_equal_one_plain_forward_over_prompt_and_answer(tiny_llava):
    model, processor = tiny_llava
    sample = shapes_samples(1)[0]
    result_cell, _ = run_cell(model, processor, Cell("full", 1.0), [sample], max_tokens=4)
    answer = answer_tokens(processor, sample, end_token(model, processor.tokenizer))
    assert answer[-1] == processor.tokenizer.eos_token_id  # the reference, then its EOS
    inputs = processor(images=[sample.image], text=[build_prompt(processor, sample.instruction)], return_tensors="pt")
    ids = torch.cat([inputs["input_ids"], torch.tensor([answer])], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0]
    start = inputs["input_ids"].shape[1] - 1
    logprobs = torch.log_softmax(logits[start : start + len(answer)], dim=-1)
    nll = -logprobs[torch.arange(len(answer)), torch.tensor(answer)].mean()
    assert result_cell["ppl"] == pytest.approx(math.exp(nll.item()), rel=1e-4)


@pytest.mark.slow  # sweeps several cells
def test_a_tiny_sweep_end_to_end(tiny_llava, tmp_path):
    model, processor = tiny_llava
    samples = shapes_samples(2)
    cells = grid(["full", "elastic", "h2o", "streaming"], [0.3, 1.0], ["elastic positions=compact"], [0.3])
    assert cells[0] == Cell("full", 1.0) and len(cells) == 1 + 3 * 2 + 1
    assert cells[-1] == Cell("elastic", 0.3, (("positions", "compact"),))
    results = sweep(model, processor, cells, samples, max_tokens=6)
    full = results[0]
    assert full["rouge_l"] == 1.0 and full["errors"] == 0 and full["samples"] == 4
    for cell in results:  # captions and answers scored apart, and together
        assert {"ppl_caption", "ppl_vqa", "rouge_l_caption", "rouge_l_vqa"} <= set(cell)
        assert min(cell["ppl_caption"], cell["ppl_vqa"]) <= cell["ppl"] <= max(cell["ppl_caption"], cell["ppl_vqa"])
    for cell in results:
        if cell["budget"] == 1.0:  # every method at budget 1.0 is the full cache
            assert cell["rouge_l"] == 1.0 and cell["ppl"] == pytest.approx(full["ppl"], rel=1e-5)
            assert cell["kv_bytes_mean"] == full["kv_bytes_mean"]
        else:
            assert cell["kv_bytes_mean"] < full["kv_bytes_mean"] and 0.0 <= cell["rouge_l"] <= 1.0
        assert set(cell) >= {"method", "budget", "ppl", "rouge_l", "accuracy", "object_f1"}
    paths = write_results({"model": "tiny", "cells": results}, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["cells"] == results
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n") == 2 + len(results) and "elastic positions=compact" in table
    for metric in ("ppl", "rouge_l", "accuracy"):
        png = tmp_path / f"{metric}.png"
        assert png in paths and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert Image.open(png).size == (720, 480)


@pytest.mark.slow  # sweeps several cells
def test_bring_your_own_parquet_runs_the_same_way(tiny_llava, tmp_path):
    from elastic_ray.data.shapes import write_shards

    write_shards(tmp_path / "data", 3, rows_per_shard=3, seed=0, split="test")
    samples = parquet_samples(str(tmp_path / "data"))
    assert len(samples) == 3 and all(s.kind == "reference" for s in samples)
    result, texts = run_cell(*tiny_llava, Cell("elastic", 0.5), samples, max_tokens=4)
    assert result["accuracy"] is None and result["ppl"] > 1.0 and len(texts) == 3
    # the demo shards' references are shapes captions: with that kind they are scored for accuracy
    captions = parquet_samples(str(tmp_path / "data"), 2, offset=1, kind="caption")
    assert [s.id for s in captions] == [s.id for s in samples[1:]] and captions[0].kind == "caption"
    scored, _ = run_cell(*tiny_llava, Cell("elastic", 0.5), captions, max_tokens=4)
    assert scored["caption_exact_match"] is not None and scored["vqa_accuracy"] is None
    with pytest.raises(ValueError, match="no rows from row 3 on"):
        parquet_samples(str(tmp_path / "data"), 2, offset=3)
    with pytest.raises(ValueError, match="no column"):
        parquet_samples(str(tmp_path / "data"), reference_column="answer")


def test_a_variant_is_a_method_and_its_options_written_as_a_cell_label():
    assert variant("h2o recent_ratio=0") == ("h2o", (("recent_ratio", 0),))
    cell = Cell("elastic", 0.5, (("protect_text", True), ("importance", "instruction"), ("offset", 5)))
    assert cell.label == "elastic protect_text=true importance=instruction offset=5"
    assert Cell(cell.method, 0.5, variant(cell.label)[1]) == cell


def seed_cell(label, budget, **scores):
    return {"method": label.split()[0], "budget": budget, "options": {}, "label": label, "samples": 4, "errors": 0,
            **scores}


def test_seeds_combine_into_their_mean_with_half_the_range_as_spread():
    runs = {0: [seed_cell("full", 1.0, ppl=1.0, rouge_l=1.0, accuracy=0.8)],
            1: [seed_cell("full", 1.0, ppl=2.0, rouge_l=1.0, accuracy=0.6)]}
    [cell] = combine_seeds(runs)
    assert cell["ppl"] == 1.5 and cell["spread"]["ppl"] == 0.5 and cell["samples"] == 8
    assert cell["accuracy"] == pytest.approx(0.7) and cell["spread"]["accuracy"] == pytest.approx(0.1)
    assert cell["caption_exact_match"] is None and "caption_exact_match" not in cell["spread"]
    assert [s["ppl"] for s in cell["seeds"]] == [1.0, 2.0] and [s["seed"] for s in cell["seeds"]] == [0, 1]


def test_targets_are_checked_seed_by_seed():
    def cells_for(seed, preset_ppl, preset_accuracy_02):
        return [seed_cell("full", 1.0, ppl=1.0, rouge_l=1.0, accuracy=0.80),
                seed_cell("elastic-vl", 0.5, ppl=preset_ppl, rouge_l=0.95, accuracy=0.79),
                seed_cell("h2o", 0.5, ppl=2.0, rouge_l=0.90, accuracy=0.70),
                seed_cell("elastic-vl", 0.2, ppl=9.0, rouge_l=0.70, accuracy=preset_accuracy_02)]

    table = targets(combine_seeds({0: cells_for(0, 1.5, 0.72), 1: cells_for(1, 2.5, 0.70)}), "elastic-vl")
    rows = {tuple(r.split(" | ")[:2]): r.split(" | ")[-1].rstrip(" |") for r in table.splitlines()[2:]}
    assert rows[("| PPL better than h2o", "0.5")] == "1 of 2"  # 1.5 < 2.0 on seed 0 only
    assert rows[("| ROUGE-L better than h2o", "0.5")] == "2 of 2"
    assert rows[("| task accuracy within 2 points of full", "0.5")] == "2 of 2"
    assert rows[("| task accuracy at least 90 % of full", "0.2")] == "1 of 2"  # 0.72 >= 0.72, 0.70 < 0.72
    assert len(rows) == 4  # nothing about 0.2 against h2o: the H2O targets are for 0.3 to 0.7


def test_the_readme_preset_is_one_command_and_another_model_one_flag_more():
    spec = importlib.util.spec_from_file_location("evaluate_job", Path(__file__).parents[1] / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    readme = job.parse_args(["--preset", "readme"])
    assert readme.seeds == [0, 1] and "h2o recent_ratio=0" in readme.methods and "elastic-vl" in readme.methods
    assert readme.out == "elastic_ray/eval/demo_results" and readme.model == "demo"
    other = job.parse_args(["--preset", "readme", "--model", "/models/demo-llava"])
    assert other.out == "elastic_ray/eval/demo_results/demo-llava" and other.methods == readme.methods
    assert job.parse_args(["--preset", "readme", "--samples", "3"]).samples == 3  # flags override the preset
    assert job.parse_args([]).out == "out/eval"
    v2 = job.parse_args(["--preset", "readme", "--model", "demo-v2"])  # its own scenes, room for descriptions
    assert (v2.scenes, v2.max_tokens, v2.out) == ("demo-v2", 128, "elastic_ray/eval/demo_results/demo-v2")
    assert (readme.scenes, readme.max_tokens) == ("demo", 48)
    v2_preset = job.parse_args(["--preset", "readme-v2"])  # the same sweep, demo-v2 by name
    assert (v2_preset.model, v2_preset.out, v2_preset.methods) == ("demo-v2", v2.out, readme.methods)
    assert job.parse_args([]).model == "demo-v2"  # the default model, its scenes
    trained = job.parse_args(["--model", "/runs/demo-v2", "--scenes", "demo-v2"])
    assert (trained.scenes, trained.max_tokens) == ("demo-v2", 128)


@pytest.mark.slow  # jobs/evaluate.py in a subprocess
def test_the_job_rejects_bad_arguments_before_loading_anything():
    for bad in (["--methods", "elastic,lru"], ["--budgets", "0.5,1.5"], ["--methods", "elastic-vl assign"],
                ["--ablations", "h2o top=3"]):
        run = subprocess.run([sys.executable, "jobs/evaluate.py", *bad], capture_output=True, text=True)
        assert run.returncode == 2 and "error:" in run.stderr


@pytest.mark.slow  # captions at budget after budget
def test_auto_budget_picks_the_smallest_budget_meeting_the_target(tiny_llava):
    from elastic_ray.eval.calibrate import choose_budget

    samples = shapes_samples(2)
    loose = choose_budget(*tiny_llava, samples, "elastic", target_rouge=0.01, max_tokens=6, candidates=(0.5, 0.2))
    assert loose["budget"] == 0.2 and loose["tried"] == [{"budget": 0.2, "rouge_l": loose["rouge_l"]}]
    assert loose["rouge_l"] >= 0.01
    strict = choose_budget(*tiny_llava, samples, "elastic", target_rouge=1.0, max_tokens=6, candidates=(0.1,))
    if strict["tried"][0]["rouge_l"] < 1.0:
        assert strict["budget"] == 1.0 and strict["rouge_l"] is None
    else:
        assert strict["budget"] == 0.1
    with pytest.raises(ValueError):
        choose_budget(*tiny_llava, samples, "elastic", target_rouge=1.5, max_tokens=6)


def test_auto_budget_runs_the_method_with_its_options(tiny_llava):
    from elastic_ray.eval.calibrate import choose_budget

    samples = shapes_samples(2)
    chosen = choose_budget(*tiny_llava, samples, "elastic", target_rouge=1.0, max_tokens=6, candidates=(0.3,),
                           options={"protect": 8})
    assert chosen["options"] == {"protect": 8}
    _, full = run_cell(*tiny_llava, Cell("full", 1.0), samples, 6, score_ppl=False)
    protected, _ = run_cell(*tiny_llava, Cell("elastic", 0.3, (("protect", 8),)), samples, 6, full, score_ppl=False)
    assert chosen["tried"] == [{"budget": 0.3, "rouge_l": protected["rouge_l"]}]
