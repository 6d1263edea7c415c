"""The figures of a tested model's curves: ``adaptation.png`` (the query metric after each
adaptation step) and ``<axis>.png`` (against another axis, e.g. ``instance.png``), mean with CI
bars, one line per split. The :class:`metarun.tracking.FileTracker` writes them; the W&B tracker
uploads them.
"""

from __future__ import annotations

from pathlib import Path

from metarun.statistics import axis_metric, curve_metric


def metric_label(metric: str) -> str:
    """How a metric name reads in a title: ``accuracy``, ``loss``, ``MSE``."""
    return {"acc": "accuracy", "loss": "loss"}.get(metric, metric.upper())


def plot_adaptation(curves: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Query accuracy (or loss, for regression) against adaptation step, with CI bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = curve_metric(curves)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for split, summary in curves.items():
        mean, ci = summary[f"{metric}_mean"], summary[f"{metric}_ci95"]
        ax.errorbar(range(len(mean)), mean, yerr=ci, marker="o", capsize=3, label=split)
    ax.set_xlabel("adaptation step")
    ax.set_ylabel(f"query {metric_label(metric)}")
    ax.set_xticks(range(max(len(s[f"{metric}_mean"]) for s in curves.values())))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_axis(axis: str, splits: dict[str, dict[str, list]], path: Path) -> None:
    """A metric (accuracy when there is one) against the positions of ``axis``, with CI bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = axis_metric(splits)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for split, summary in splits.items():
        shown = [(p, m, c) for p, m, c in zip(summary["position"], summary[f"{metric}_mean"],
                                              summary[f"{metric}_ci95"], strict=True) if m is not None]
        if shown:
            positions, means, cis = zip(*shown, strict=True)
            ax.errorbar(positions, means, yerr=cis, marker="o", capsize=3, label=split)
    ax.set_xlabel(axis)
    ax.set_ylabel(metric_label(metric))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
