"""Accuracy against k: the Best-of-k curve with pass@1, majority@N and oracle@N reference lines (PNG).

Uses matplotlib's object API with the Agg canvas directly, so no global backend is switched and no display is
needed.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_data(summary: dict, title: str) -> dict:
    """What the Best-of-k plot of one scope draws (compare this, not the PNG's bytes).

    Returns:
        `title`, `curves` (label → [(k, accuracy)]: Best-of-k, majority@k, oracle@k) and `lines`
        (label → accuracy: majority@N, oracle@N, pass@1).
    """
    curves = {"Best-of-k (PRM)": sorted((int(k), float(v)) for k, v in summary["best_of_k"].items())}
    n = curves["Best-of-k (PRM)"][-1][0]
    lines = {}
    for key, curve_key, label in (
        ("majority", "majority_at_k", "majority"),
        ("oracle", "oracle_at_k", "oracle"),
    ):
        lines[f"{label}@{n} = {summary[key]:.3f}"] = float(summary[key])
        at_k = sorted((int(k), float(v)) for k, v in summary.get(curve_key, {}).items())
        if at_k:
            curves[f"{label}@k"] = at_k
    lines[f"pass@1 (greedy) = {summary['pass_at_1']:.3f}"] = float(summary["pass_at_1"])
    return {"title": f"{title} ({summary['items']} items)", "curves": curves, "lines": lines}


_COLOURS = {"Best-of-k": "tab:blue", "majority": "tab:green", "oracle": "tab:red", "pass@1": "black"}


def _colour(label: str) -> str:
    return next(colour for prefix, colour in _COLOURS.items() if label.startswith(prefix))


def plot_best_of_k(summary: dict, path: str | Path, title: str) -> Path:
    """Write the accuracy-vs-k plot of one scope (`plot_data`'s curves and reference lines).

    Args:
        summary: a scope's metrics from `vlpipe.components.evaluate.metrics.summarize` (`best_of_k`, `oracle_at_k`,
            `majority_at_k` keyed by k, int or str, and `pass_at_1`, `majority`, `oracle`).
        path: the PNG to write.
        title: the plot's title.

    Returns:
        The PNG's path.
    """
    data = plot_data(summary, title)
    ks = [k for k, _ in data["curves"]["Best-of-k (PRM)"]]
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, points in data["curves"].items():
        main = label.startswith("Best-of-k")
        ax.plot(
            [k for k, _ in points],
            [v for _, v in points],
            marker="o" if main else ".",
            color=_colour(label),
            alpha=1.0 if main else 0.35,
            label=label,
        )
    for label, value in data["lines"].items():
        ax.axhline(
            value, color=_colour(label), linestyle=":" if label.startswith("pass@1") else "--", label=label
        )
    if len(ks) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("k (samples scored by the PRM)")
    ax.set_ylabel("accuracy")
    ax.set_title(data["title"])
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
