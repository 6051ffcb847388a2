"""The report's plots (matplotlib, Agg, PNG): throughput and quality against budget, cost per method.
Each plot is drawn only from known figures and only with two points or more; it returns the points
it drew with their rows, or the sentence that stands in for it."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from elastic_ray.report.figures import Row  # noqa: E402
from elastic_ray.report.inputs import Run  # noqa: E402
from elastic_ray.report.quality import default_cells  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def throughput(rows: list[Row], path: Path) -> list[dict] | str:
    """Generated tokens/s against budget, one line per run and method."""
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for row in rows:
        if row.figures["tokens_per_s"].known:
            key = (f"{row.kind}: {row.model}", row.method)
            series.setdefault(key, []).append((row.budget, row.figures["tokens_per_s"].value))
    budgets = sorted({b for points in series.values() for b, _ in points})
    if len(budgets) < 2:
        measured_at = f"at budget {budgets[0]:g} only" if budgets else "nowhere"
        return f"the inputs measure generated tokens/s {measured_at}; the table holds it"
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    for (run, method), points in sorted(series.items()):
        points.sort()
        ax.plot([b for b, _ in points], [t for _, t in points], marker="o", label=f"{run}, {method}")
    ax.set_xlabel("budget (fraction of KV entries kept)")
    ax.set_ylabel("generated tokens/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
    return [{"series": f"{run}, {method}", "budget": b, "tokens_per_s": t}
            for (run, method), points in sorted(series.items()) for b, t in points]


def quality(evaluations: dict[str, Run], path: Path) -> list[dict] | str:
    """ROUGE-L (vs the full cache) and task accuracy against budget, per method, from the latest
    evaluation of each model."""
    points = [{"model": model, "method": cell["method"], "budget": cell["budget"], "metric": metric,
               "value": cell[metric], "source": run.source, "field": f"cells[{i}].{metric}"}
              for model, run in sorted(evaluations.items()) for i, cell in default_cells(run)
              for metric in ("rouge_l", "accuracy") if cell.get(metric) is not None]
    if len({p["budget"] for p in points}) < 2:
        return ("no evaluation among the inputs" if not evaluations else
                "the evaluations among the inputs score fewer than two budgets; the tables hold them")
    metrics = [m for m in ("rouge_l", "accuracy") if any(p["metric"] == m for p in points)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), dpi=110, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for key in sorted({(p["model"], p["method"]) for p in points if p["metric"] == metric}):
            line = sorted((p["budget"], p["value"]) for p in points if (p["model"], p["method"]) == key
                          and p["metric"] == metric)
            ax.plot([b for b, _ in line], [v for _, v in line], marker="o", label=f"{key[0]}, {key[1]}")
        ax.set_xlabel("budget (fraction of KV entries kept)")
        ax.set_ylabel({"rouge_l": "ROUGE-L F1 vs full cache", "accuracy": "task accuracy"}[metric])
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)
    return points


def cost(rows: list[Row], path: Path) -> list[dict] | str:
    """Cost per 1M captions for every row where it is known, grouped by method."""
    known = sorted((row for row in rows if row.figures["cost_per_million_captions"].known),
                   key=lambda r: (r.method, r.budget, r.label))
    if len(known) < 2:
        return ("no input has a known cost (device-hours and rows)" if not known else
                f"one row has a known cost ({known[0].label}); the headline holds it")
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(known) + 1.5), dpi=110)
    methods = sorted({r.method for r in known})
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    values = [r.figures["cost_per_million_captions"].value for r in known]
    ax.barh(range(len(known)), values, color=[colors[r.method] for r in known])
    ax.set_yticks(range(len(known)), [f"{r.label} ({r.model})" for r in known], fontsize=7)
    ax.invert_yaxis()
    if max(values) > 50 * min(values):
        ax.set_xscale("log")
    ax.set_xlabel("USD per 1M captions, at the assumed price of each row's device kind")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    return [{"row": r.label, "source": r.source, "method": r.method, "budget": r.budget, "device": r.device, "value": v}
            for r, v in zip(known, values)]


PLOTS = {"throughput_vs_budget": "Throughput against budget", "quality_vs_budget": "Quality against budget",
         "cost_per_method": "Cost per 1M captions per method"}


def draw_all(rows: list[Row], evaluations: dict[str, Run], out: Path) -> dict[str, dict]:
    """Every plot as out/<name>.png; per plot its file and points, or why it was not drawn."""
    drawn = {"throughput_vs_budget": throughput(rows, out / "throughput_vs_budget.png"),
             "quality_vs_budget": quality(evaluations, out / "quality_vs_budget.png"),
             "cost_per_method": cost(rows, out / "cost_per_method.png")}
    return {name: ({"title": PLOTS[name], "file": None, "reason": drawn} if isinstance(drawn, str)
                   else {"title": PLOTS[name], "file": f"{name}.png", "points": drawn})
            for name, drawn in drawn.items()}
