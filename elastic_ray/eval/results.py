"""A sweep's outputs: results.json, a Markdown table, and one PNG plot per metric against budget.

Several seeds (disjoint sample sets) combine into one cell per variant and budget: each metric is
the mean of the seeds' values, `spread[metric]` half their range, `seeds` the values themselves.
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

METRICS = {"ppl": "PPL (lower is better)", "rouge_l": "ROUGE-L F1 vs full cache", "accuracy": "task accuracy"}
SCORES = ["ppl", "ppl_caption", "ppl_description", "ppl_vqa", "rouge_l", "rouge_l_caption", "rouge_l_description",
          "rouge_l_vqa", "accuracy", "caption_exact_match", "object_f1", "description_exact_match", "vqa_accuracy",
          "kv_bytes_mean", "kv_bytes_full_mean", "slot_entries"]
COLUMNS = ["label", "budget", *SCORES[:-2], "errors"]


def combine_seeds(runs: dict[int, list[dict]]) -> list[dict]:
    """One cell per (label, budget) from each seed's sweep (`runs[seed]`, cells in the same order)."""
    combined = []
    for cells in zip(*runs.values()):
        first = cells[0]
        cell = {k: first[k] for k in ("method", "budget", "options", "label")}
        cell["samples"] = sum(c["samples"] for c in cells)
        cell["errors"] = sum(c["errors"] for c in cells)
        cell["spread"] = {}
        for score in SCORES:
            values = [c.get(score) for c in cells]
            if any(v is None for v in values):
                cell[score] = None
                continue
            cell[score] = sum(values) / len(values)
            cell["spread"][score] = (max(values) - min(values)) / 2
        cell["seeds"] = [{"seed": seed, **{s: c.get(s) for s in SCORES}} for seed, c in zip(runs, cells)]
        combined.append(cell)
    return combined


def format_score(cell: dict, score: str) -> str:
    """`mean ± spread` (the spread only where there are several seeds)."""
    value = cell.get(score)
    if value is None:
        return "n/a"
    spec = ".3g" if score.startswith("ppl") else ",.0f" if score in ("kv_bytes_mean", "kv_bytes_full_mean") else ".3f"
    spread = cell.get("spread", {}).get(score)
    several = spread is not None and len(cell.get("seeds", [])) > 1
    return format(value, spec) + (f" ± {format(spread, spec)}" if several else "")


def markdown_table(cells: list[dict]) -> str:
    present = [c for c in COLUMNS if any(cell.get(c) is not None for cell in cells)]
    rows = ["| " + " | ".join(present) + " |", "|" + "---|" * len(present)]
    for cell in sorted(cells, key=lambda c: (c["label"], -c["budget"])):
        rows.append("| " + " | ".join(format_score(cell, c) if c in SCORES else _format(cell.get(c))
                                      for c in present) + " |")
    return "\n".join(rows)


def _format(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def plot(cells: list[dict], metric: str, path: Path, labels: list[str] | None = None) -> None:
    """`metric` against budget, one line per variant in `labels` (default: all), with the seeds'
    spread as error bars; the full cache as a level line."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    full = [c for c in cells if c["method"] == "full"]
    for label in labels or sorted({c["label"] for c in cells}):
        line = sorted((c for c in cells if c["label"] == label and c["method"] != "full" and c.get(metric) is not None),
                      key=lambda c: c["budget"])
        if line:
            ax.errorbar([c["budget"] for c in line], [c[metric] for c in line], marker="o", capsize=3, label=label,
                        yerr=[c.get("spread", {}).get(metric, 0.0) for c in line])
    if full and full[0].get(metric) is not None:
        ax.axhline(full[0][metric], color="black", linestyle="--", linewidth=1, label="full cache")
    ax.set_xlabel("budget (fraction of KV entries kept)")
    ax.set_ylabel(METRICS[metric])
    if metric == "ppl":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_results(result: dict, out: Path, extra: dict[str, str] | None = None) -> list[Path]:
    """Write results.json, results.md, <metric>.png (the variants in `result["methods"]`, default
    all) and each `extra` {file name: text} under `out`; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md"]
    paths[0].write_text(json.dumps(result, indent=2))
    paths[1].write_text(markdown_table(result["cells"]) + "\n")
    for metric in METRICS:
        if any(c.get(metric) is not None for c in result["cells"]):
            paths.append(out / f"{metric}.png")
            plot(result["cells"], metric, paths[-1], result.get("methods"))
    for name, text in (extra or {}).items():
        paths.append(out / name)
        paths[-1].write_text(text)
    return paths
