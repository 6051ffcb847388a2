"""A run's own fidelity: what counts as a degenerate caption, and the spot check on the demo model."""

import pytest

from elastic_ray.config import EngineConfig
from elastic_ray.data.shapes import CAPTION_INSTRUCTION, make_scenes
from elastic_ray.eval.metrics import rouge_l
from elastic_ray.eval.samples import Sample
from elastic_ray.eval.spot_check import degenerate, spot_check
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


def test_the_spot_check_scores_the_method_against_the_full_cache_on_the_demo_model():
    model, processor = load("demo")
    samples = [Sample(str(i), scene.image, CAPTION_INSTRUCTION, scene.caption, "caption")
               for i, scene in enumerate(make_scenes(4, seed=3, split="test"))]
    cell, engine = Cell("elastic", 0.5), EngineConfig(max_num_seqs=4, max_tokens=40)
    result = spot_check(model, processor, samples, cell, engine)
    _, full = run_cell(model, processor, Cell(*FULL), samples, 40, engine=engine, score_ppl=False)
    _, texts = run_cell(model, processor, cell, samples, 40, full, engine=engine, score_ppl=False)
    assert result["rouge_l"] == round(rouge_l(texts, full), 4)
    assert result["degenerate"] == sum(map(degenerate, texts))
    assert result["degenerate_full"] == 0  # the demo model's full-cache captions are clean sentences
    assert spot_check(model, processor, samples, Cell(*FULL), engine) == {"rouge_l": 1.0, "degenerate": 0,
                                                                       "degenerate_full": 0}
