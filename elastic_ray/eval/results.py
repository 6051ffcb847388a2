"""A sweep's outputs: results.json, a Markdown table, and one PNG plot per metric against budget."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

METRICS = {"ppl": "PPL (lower is better)", "rouge_l": "ROUGE-L F1 vs full cache", "accuracy": "task accuracy"}
COLUMNS = ["label", "budget", "ppl", "rouge_l", "accuracy", "caption_exact_match", "object_f1", "vqa_accuracy",
           "kv_bytes_mean", "errors"]


def markdown_table(cells: list[dict]) -> str:
    present = [c for c in COLUMNS if any(cell.get(c) is not None for cell in cells)]
    rows = ["| " + " | ".join(present) + " |", "|" + "---|" * len(present)]
    for cell in sorted(cells, key=lambda c: (c["label"], -c["budget"])):
        rows.append("| " + " | ".join(_format(cell.get(c)) for c in present) + " |")
    return "\n".join(rows)


def _format(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def plot(cells: list[dict], metric: str, path: Path) -> None:
    """`metric` against budget, one line per method (and ablation); the full cache as a level line."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    full = [c for c in cells if c["method"] == "full"]
    for label in sorted({c["label"] for c in cells if c["method"] != "full"}):
        line = sorted((c for c in cells if c["label"] == label and c.get(metric) is not None), key=lambda c: c["budget"])
        if line:
            ax.plot([c["budget"] for c in line], [c[metric] for c in line], marker="o", label=label)
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


def write_results(result: dict, out: Path) -> list[Path]:
    """Write results.json, results.md and <metric>.png under `out`; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md"]
    paths[0].write_text(json.dumps(result, indent=2))
    paths[1].write_text(markdown_table(result["cells"]) + "\n")
    for metric in METRICS:
        if any(c.get(metric) is not None for c in result["cells"]):
            paths.append(out / f"{metric}.png")
            plot(result["cells"], metric, paths[-1])
    return paths
