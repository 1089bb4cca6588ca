"""Figures logged with each detector version (matplotlib's object API, no global pyplot state)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

__all__ = ["roc_figure", "score_histograms", "mean_activation_figure"]


def roc_figure(generated: np.ndarray, others: Mapping[str, np.ndarray], threshold: float) -> Figure:
    """ROC of the generator's held-out scores against each other source (scores: higher = more typical)."""
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    for name, scores in others.items():
        labels = np.r_[np.ones(len(generated)), np.zeros(len(scores))]
        fpr, tpr, _ = roc_curve(labels, np.r_[generated, scores])
        ax.plot(fpr, tpr, label=name)
        ax.scatter([np.mean(scores >= threshold)], [np.mean(generated >= threshold)], marker="o")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(xlabel="other source attributed (FPR)", ylabel="own samples attributed (TPR)", title="ROC; dots: live threshold")
    ax.legend(loc="lower right", fontsize="small")
    return fig


def score_histograms(scores: Mapping[str, np.ndarray], threshold: float) -> Figure:
    """One histogram per source on shared bins, with the decision threshold."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    finite = np.concatenate([s[np.isfinite(s)] for s in scores.values()])
    bins = np.linspace(finite.min(), finite.max(), 60)
    for name, values in scores.items():
        ax.hist(values, bins=bins, alpha=0.5, label=name)
    ax.axvline(threshold, color="black", linestyle="--", label="threshold")
    ax.set(xlabel="score (higher = more typical of the generator)", ylabel="items")
    ax.legend(fontsize="small")
    return fig


def mean_activation_figure(means: Mapping[str, np.ndarray]) -> Figure:
    """The mean recovered penultimate activation per source, channel-averaged for images."""
    fig = Figure(figsize=(3.2 * len(means), 3.2))
    for k, (name, mean) in enumerate(means.items()):
        ax = fig.add_subplot(1, len(means), k + 1)
        mean = np.asarray(mean)
        if mean.ndim == 3:
            ax.imshow(mean.mean(0), cmap="viridis")
            ax.set_axis_off()
        else:
            ax.plot(mean)
        ax.set_title(name, fontsize="small")
    fig.suptitle("mean reconstructed activation")
    return fig
