"""Accuracy against k: the Best-of-k curve with pass@1, majority@N and oracle@N reference lines (PNG).

Uses matplotlib's object API with the Agg canvas directly, so no global backend is switched and no display is
needed.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_best_of_k(summary: dict, path: str | Path, title: str) -> Path:
    """Write the accuracy-vs-k plot of one scope.

    Args:
        summary: a scope's metrics from `vlpipe.components.evaluate.metrics.summarize` (`best_of_k`, `oracle_at_k`,
            `majority_at_k` keyed by k, int or str, and `pass_at_1`, `majority`, `oracle`).
        path: the PNG to write.
        title: the plot's title.

    Returns:
        The PNG's path.
    """
    curve = sorted((int(k), float(v)) for k, v in summary["best_of_k"].items())
    ks = [k for k, _ in curve]
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(ks, [v for _, v in curve], marker="o", color="tab:blue", label="Best-of-k (PRM)")
    for key, curve_key, label, colour in (
        ("majority", "majority_at_k", "majority", "tab:green"),
        ("oracle", "oracle_at_k", "oracle", "tab:red"),
    ):
        ax.axhline(summary[key], color=colour, linestyle="--", label=f"{label}@{ks[-1]} = {summary[key]:.3f}")
        at_k = sorted((int(k), float(v)) for k, v in summary.get(curve_key, {}).items())
        if at_k:
            ax.plot(
                [k for k, _ in at_k],
                [v for _, v in at_k],
                color=colour,
                alpha=0.35,
                marker=".",
                label=f"{label}@k",
            )
    ax.axhline(
        summary["pass_at_1"],
        color="black",
        linestyle=":",
        label=f"pass@1 (greedy) = {summary['pass_at_1']:.3f}",
    )
    if len(ks) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("k (samples scored by the PRM)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} ({summary['items']} items)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
