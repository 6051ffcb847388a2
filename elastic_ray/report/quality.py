"""Quality at a run's budget: the matching cell of the latest evaluation of the same model."""

from elastic_ray.report.inputs import Run
from elastic_ray.report.provenance import Figure, measured, not_measured

# Scores the report shows, and their units; an evaluation on data without a task scorer has no accuracy.
SCORES = {"rouge_l": "ROUGE-L F1 vs full cache", "accuracy": "task accuracy", "ppl": "perplexity"}


def latest_evaluations(runs: list[Run]) -> dict[str, Run]:
    """The most recently written evaluation of each model (later inputs win ties)."""
    latest: dict[str, Run] = {}
    for run in runs:
        if run.kind == "evaluation":
            current = latest.get(run.data["model"])
            if current is None or (run.modified or 0) >= (current.modified or 0):
                latest[run.data["model"]] = run
    return latest


def default_cells(evaluation: Run) -> list[tuple[int, dict]]:
    """The cells run with a method's default options (not ablations), with their indices."""
    return [(i, c) for i, c in enumerate(evaluation.data["cells"]) if not c.get("options")]


def quality(model: str, method: str, budget: float, evaluations: dict[str, Run]) -> dict[str, Figure]:
    """The scores of `method` at `budget` in the latest evaluation of `model`, each 'not measured'
    (with the reason) where there is no such evaluation or cell; transformers' own generate() is the
    full cache."""
    method = "full" if method == "generate" else method
    evaluation = evaluations.get(model)
    if evaluation is None:
        return {name: not_measured(unit, f"no evaluation of model {model!r} among the inputs")
                for name, unit in SCORES.items()}
    for i, cell in default_cells(evaluation):
        if cell["method"] == method and abs(cell["budget"] - budget) < 1e-9:
            return {name: measured(cell.get(name), unit, evaluation.source, f"cells[{i}].{name}")
                    for name, unit in SCORES.items()}
    return {name: not_measured(unit, f"the latest evaluation of {model!r} ({evaluation.source}) has no "
                                     f"{method} cell at budget {budget:g}")
            for name, unit in SCORES.items()}
