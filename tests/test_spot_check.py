"""A run's own fidelity: what counts as a degenerate caption, and the spot check on the demo model."""

import pytest

from elastic_ray.config import EngineConfig
from elastic_ray.data.shapes import CAPTION_INSTRUCTION, make_scenes
from elastic_ray.eval.metrics import rouge_l
from elastic_ray.eval.samples import Sample
from elastic_ray.eval.spot_check import degenerate, fidelity
from elastic_ray.eval.sweep import FULL, Cell, run_cell
from elastic_ray.models.loading import load


@pytest.mark.parametrize("caption", [
    "a large orange triangle at right right right right",
    "Right RIGHT right",  # case does not matter
    "right, right. right!",  # nor punctuation
    "on the left on the left on the left of the image",
    "a red circle , a red circle , a red circle",
    "",
    " . , ",
])
def test_a_phrase_three_times_in_a_row_or_no_words_is_degenerate(caption):
    assert degenerate(caption)


@pytest.mark.parametrize("caption", [
    "a small red circle at the top left and a small red circle at the bottom right",
    "right right",  # twice is not enough
    "a large blue square in the center .",
    "one two one two one",  # a phrase must come whole three times
])
def test_captions_with_repeated_words_but_no_loop_are_not(caption):
    assert not degenerate(caption)


def test_fidelity_scores_captions_against_the_full_caches():
    captions = ["a red circle at the top left .", "a blue square square square", "a green cross"]
    references = ["a red circle at the top left .", "a blue square in the center .", "a green cross at the right ."]
    assert fidelity(captions, references) == {"rouge_l": round(rouge_l(captions, references), 4), "degenerate": 1,
                                              "degenerate_full": 0}
    assert fidelity(references, references)["rouge_l"] == 1.0


def test_on_the_demo_model_full_cache_captions_are_clean_and_the_published_default_loops():
    model, processor = load("demo")
    samples = [Sample(str(i), scene.image, CAPTION_INSTRUCTION, scene.caption, "caption")
               for i, scene in enumerate(make_scenes(8, seed=3, split="test"))]
    engine = EngineConfig(max_num_seqs=8, max_tokens=48)
    _, full = run_cell(model, processor, Cell(*FULL), samples, 48, engine=engine, score_ppl=False)
    _, elastic = run_cell(model, processor, Cell("elastic", 0.5), samples, 48, full, engine=engine, score_ppl=False)
    assert not any(map(degenerate, full))  # the reference captions are sentences
    assert any(map(degenerate, elastic))  # the paper's defaults at 0.5 repeat themselves on this model
