"""The README's evaluation tables, from a combined sweep (`results.combine_seeds`): captions and
short answers side by side per budget and method, the option ablations, and issue 17's targets
for the preset against canonical H2O and the full cache."""

from elastic_ray.eval.results import format_score

KIND_SCORES = {"ppl_caption": "caption PPL", "rouge_l_caption": "caption ROUGE-L",
               "caption_exact_match": "caption exact", "ppl_description": "description PPL",
               "rouge_l_description": "description ROUGE-L", "description_exact_match": "description exact",
               "ppl_vqa": "answer PPL", "rouge_l_vqa": "answer ROUGE-L", "vqa_accuracy": "answer accuracy"}
ALL_SCORES = {"ppl": "PPL", "rouge_l": "ROUGE-L", "accuracy": "task accuracy"}


def _find(cells: list[dict], label: str, budget: float) -> dict | None:
    return next((c for c in cells if c["label"] == label and abs(c["budget"] - budget) < 1e-9), None)


def _table(cells: list[dict], rows: list[tuple[str, float]], scores: dict[str, str]) -> str:
    """One row per (label, budget) that was run; `scores` {key: column title}."""
    lines = ["| budget | method | " + " | ".join(scores.values()) + " |", "|---|---|" + "---|" * len(scores)]
    for label, budget in rows:
        cell = _find(cells, label, budget)
        if cell is not None:
            lines.append(f"| {budget:g} | {label} | " + " | ".join(format_score(cell, s) for s in scores) + " |")
    return "\n".join(lines)


def scores_table(cells: list[dict], labels: list[str], budgets: list[float]) -> str:
    """Captions and answers scored separately (shapes samples), every label at every budget."""
    scores = ({k: title for k, title in KIND_SCORES.items() if any(c.get(k) is not None for c in cells)}
              if any(c.get("ppl_caption") is not None for c in cells) else ALL_SCORES)
    return _table(cells, [("full", 1.0)] + [(label, b) for b in sorted(budgets, reverse=True) for label in labels],
                  scores)


def ablation_table(cells: list[dict], labels: list[str], budgets: list[float]) -> str:
    """The option ablations (and what they vary from), all samples together."""
    return _table(cells, [(label, b) for b in sorted(budgets) for label in labels], ALL_SCORES)


def _values(cell: dict, score: str) -> list[float]:
    return [seed[score] for seed in cell["seeds"]]


def targets(cells: list[dict], preset: str, baseline: str = "h2o") -> str:
    """Issue 17's targets for `preset`, per budget run, with the margin on each seed."""
    full = _find(cells, "full", 1.0)
    lines = ["| target | budget | preset | reference | met on seeds |", "|---|---|---|---|---|"]
    for budget in sorted({c["budget"] for c in cells if c["label"] == preset}):
        ours, theirs = _find(cells, preset, budget), _find(cells, baseline, budget)
        if 0.3 - 1e-9 <= budget <= 0.7 + 1e-9 and theirs is not None:
            for score, better in (("ppl", lambda a, b: a < b), ("rouge_l", lambda a, b: a > b)):
                if ours.get(score) is None:
                    continue
                met = [better(a, b) for a, b in zip(_values(ours, score), _values(theirs, score))]
                lines.append(f"| {ALL_SCORES[score]} better than {baseline} | {budget:g} | {format_score(ours, score)} | "
                             f"{format_score(theirs, score)} | {sum(met)} of {len(met)} |")
        if abs(budget - 0.5) < 1e-9:
            met = [f - a <= 0.02 + 1e-9 for a, f in zip(_values(ours, "accuracy"), _values(full, "accuracy"))]
            lines.append(f"| task accuracy within 2 points of full | {budget:g} | {format_score(ours, 'accuracy')} | "
                         f"{format_score(full, 'accuracy')} | {sum(met)} of {len(met)} |")
        if abs(budget - 0.2) < 1e-9:
            met = [a >= 0.9 * f - 1e-9 for a, f in zip(_values(ours, "accuracy"), _values(full, "accuracy"))]
            lines.append(f"| task accuracy at least 90 % of full | {budget:g} | {format_score(ours, 'accuracy')} | "
                         f"0.9 x {format_score(full, 'accuracy')} | {sum(met)} of {len(met)} |")
    return "\n".join(lines)


def summary(result: dict, preset: str) -> str:
    """All the tables, in the order the README shows them."""
    cells = result["cells"]
    ablations = sorted({c["label"] for c in cells} - set(result["methods"]) - {"full"})
    ablation_budgets = sorted({c["budget"] for c in cells if c["label"] in ablations})
    varied = [m for m in result["methods"] if m.split()[0] in {a.split()[0] for a in ablations}]
    budgets = sorted({c["budget"] for c in cells if c["label"] in result["methods"] and c["method"] != "full"})
    seeds = ", ".join(str(s["seed"]) for s in cells[0]["seeds"])
    return "\n\n".join([
        f"Model {result['model']}, {result['data']}, {result['samples']} samples per seed, seeds {seeds} "
        f"(mean ± half the range), greedy {result['max_tokens']} tokens.",
        "### Scores by kind\n\n" + scores_table(cells, result["methods"], budgets),
        f"### Targets for {preset}\n\n" + targets(cells, preset),
        "### Ablations\n\n" + ablation_table(cells, varied + ablations, ablation_budgets),
    ]) + "\n"
