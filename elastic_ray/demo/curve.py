"""The loss curve of a demo model's training (matplotlib, Agg, PNG), drawn from its log records."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def plot_history(history: list[dict], path: Path, title: str) -> None:
    """Answer loss and patch loss (log scale) against step, and beside it each task's teacher-forced
    exact share."""
    steps = [r["step"] for r in history]
    fig, (losses, exact) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    losses.plot(steps, [r["loss"] for r in history], label="answer loss")
    patch = [(r["step"], r["patch_loss"]) for r in history if r["patch_loss"] > 0]
    if patch:
        losses.plot(*zip(*patch), label="patch loss (training only)")
    losses.set_yscale("log")
    losses.set_xlabel("step")
    losses.set_ylabel("cross-entropy")
    losses.set_title(title)
    tasks = sorted({task for r in history for task in r["exact"]})
    for task in tasks:
        points = [(r["step"], r["exact"][task]) for r in history if task in r["exact"]]
        exact.plot(*zip(*points), label=task)
    exact.set_xlabel("step")
    exact.set_ylabel("answers right in every token (teacher-forced)")
    exact.set_ylim(0, 1)
    for ax in (losses, exact):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
