"""A run's own fidelity, spot-checked: a sample of its rows captioned with the run's cache and with
the full cache, scored by ROUGE-L against the full cache's captions and by how many captions
are degenerate."""

import re

from elastic_ray.config import EngineConfig
from elastic_ray.eval.metrics import rouge_l
from elastic_ray.eval.samples import Sample
from elastic_ray.eval.sweep import FULL, Cell, run_cell

REPEATS = 3  # times in a row a phrase must come for a caption to count as degenerate


def degenerate(caption: str) -> bool:
    """Whether a caption is degenerate: empty, or some phrase of one or more words comes REPEATS or
    more times back to back ("at right right right", "a red circle, a red circle, a red circle").
    Words are runs of letters and digits, compared without case; punctuation between them is ignored."""
    words = re.findall(r"\w+", caption.lower())
    if not words:
        return True
    for n in range(1, len(words) // REPEATS + 1):
        for start in range(len(words) - REPEATS * n + 1):
            phrase = words[start:start + n]
            if all(words[start + k * n:start + (k + 1) * n] == phrase for k in range(1, REPEATS)):
                return True
    return False


def spot_check(model, processor, samples: list[Sample], cell: Cell, engine: EngineConfig) -> dict:
    """`cell`'s greedy captions of `samples` against the full cache's, both on engines sized by
    `engine` (its `max_tokens` bounds a caption): mean ROUGE-L F1 over the samples both ran, and
    the degenerate captions of each (`degenerate`, `degenerate_full`)."""
    _, full = run_cell(model, processor, Cell(*FULL), samples, engine.max_tokens, engine=engine, score_ppl=False)
    _, texts = run_cell(model, processor, cell, samples, engine.max_tokens, full, engine=engine, score_ppl=False)
    both = [(t, f) for t, f in zip(texts, full) if t is not None and f is not None]
    return {"rouge_l": round(rouge_l(*zip(*both)), 4) if both else None,
            "degenerate": sum(degenerate(t) for t, _ in both), "degenerate_full": sum(degenerate(f) for _, f in both)}
