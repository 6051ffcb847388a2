"""Auto-budget: the smallest budget whose outputs stay within a ROUGE-L target of the full cache's."""

from elastic_ray.eval.samples import Sample
from elastic_ray.eval.sweep import FULL, Cell, run_cell

CANDIDATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def choose_budget(model, processor, samples: list[Sample], method: str, target_rouge: float, max_tokens: int,
                  candidates: tuple[float, ...] = CANDIDATES, options: dict | None = None) -> dict:
    """Run the full cache, then `method` (with its `options`) at rising budgets until one meets `target_rouge`.

    Returns the choice and every measured ROUGE-L; when no candidate meets the target the
    choice is 1.0, where every method is the full cache (nothing measured there: rouge_l None).
    """
    if not 0.0 < target_rouge <= 1.0:
        raise ValueError(f"target ROUGE-L must be in (0, 1], got {target_rouge!r}")
    _, full = run_cell(model, processor, Cell(*FULL), samples, max_tokens, score_ppl=False)
    options = options or {}
    chosen = {"method": method, "options": options, "target_rouge": target_rouge, "samples": len(samples), "tried": []}
    for budget in sorted(candidates):
        cell = Cell(method, budget, tuple(sorted(options.items())))
        result, _ = run_cell(model, processor, cell, samples, max_tokens, full, score_ppl=False)
        chosen["tried"].append({"budget": budget, "rouge_l": result["rouge_l"]})
        if result["rouge_l"] >= target_rouge:
            return {**chosen, "budget": budget, "rouge_l": result["rouge_l"]}
    return {**chosen, "budget": 1.0, "rouge_l": None}
