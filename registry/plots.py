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
    """One step histogram per source on shared bins, with the decision threshold. Scores that span
    orders of magnitude (negated losses or distances: all negative) are drawn on a symmetric log
    axis, where own items and the rest are both visible; others on a linear axis."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    finite = np.concatenate([s[np.isfinite(s)] for s in scores.values()])
    log = bool(len(finite)) and finite.max() < 0 and threshold < 0
    low, high = (finite.min(), finite.max()) if len(finite) else (0.0, 1.0)
    if log:
        ax.set_xscale("symlog", linthresh=float(np.abs(finite).min()), linscale=0.01)
        to_axis = ax.xaxis.get_transform()
        edges = np.linspace(*to_axis.transform([low, high]), 61)
        bins = to_axis.inverted().transform(edges)
        xlabel = "score: the negated loss / distance (log scale; higher = more typical; attributed right of the line)"
    else:
        bins = np.linspace(low, high, 61)
        xlabel = "score (higher = more typical of the generator; attributed right of the line)"
    for name, v in scores.items():
        ax.hist(v[np.isfinite(v)], bins=bins, histtype="step", linewidth=1.5, label=name)
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold ({threshold:.3g})")
    ax.set(xlabel=xlabel, ylabel="items")
    ax.legend(fontsize="x-small", loc="upper left")
    return fig


def mean_activation_figure(means: Mapping[str, np.ndarray]) -> Figure:
    """The mean recovered penultimate activation per source, channel-averaged for images."""
    fig = Figure(figsize=(3.2 * max(len(means), 1) + 1, 3.4))
    maps = {name: np.asarray(m).mean(0) if np.asarray(m).ndim == 3 else np.asarray(m) for name, m in means.items()}
    images = [m for m in maps.values() if m.ndim == 2]
    low = min((float(m.min()) for m in images), default=0.0)
    high = max((float(m.max()) for m in images), default=1.0)
    shown = None
    for k, (name, mean) in enumerate(maps.items()):
        ax = fig.add_subplot(1, len(maps), k + 1)
        if mean.ndim == 2:
            shown = ax.imshow(mean, cmap="viridis", vmin=low, vmax=high)  # one colour scale for every source
            ax.set_axis_off()
        else:
            ax.plot(mean)
        ax.set_title(name, fontsize="small")
    if shown is not None:
        fig.colorbar(shown, ax=fig.axes, shrink=0.8, label="mean activation (channel average)")
    fig.suptitle("mean recovered penultimate activation per source" if maps else "no final-layer features for this detector kind")
    return fig
