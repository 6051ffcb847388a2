"""A run's own fidelity, spot-checked on a sample of its rows: its captions against the full cache's
captions of the same rows, by ROUGE-L and by how many captions are degenerate."""

import re

from elastic_ray.eval.metrics import rouge_l

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


def fidelity(captions: list[str], references: list[str]) -> dict:
    """Captions against the full cache's captions of the same rows (`references`): mean ROUGE-L F1,
    and the degenerate captions among each (`degenerate`, `degenerate_full`)."""
    return {"rouge_l": round(rouge_l(captions, references), 4), "degenerate": sum(map(degenerate, captions)),
            "degenerate_full": sum(map(degenerate, references))}
