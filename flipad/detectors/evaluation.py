"""Evaluating a detector the paper's way: per pair (the generator vs one other source) on balanced sets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import roc_auc_score

__all__ = ["PairResult", "evaluate_pairs", "evaluate_scores", "balanced_accuracy"]


@dataclass(frozen=True)
class PairResult:
    """Detection quality of the generator's test samples against one other source."""

    source: str
    fnr_target: float
    balanced_accuracy: float
    auc: float
    true_positives: int  # the generator's samples attributed to it
    false_negatives: int
    true_negatives: int  # the other source's samples rejected
    false_positives: int

    def to_dict(self) -> dict:
        return asdict(self)


def balanced_accuracy(generated_accepted: np.ndarray, other_accepted: np.ndarray) -> float:
    """Mean of the true-positive rate on the generator's samples and the true-negative rate on the others."""
    return float((np.mean(generated_accepted) + 1.0 - np.mean(other_accepted)) / 2.0)


def evaluate_pairs(detector, generated: np.ndarray, others: Mapping[str, np.ndarray]) -> list[PairResult]:
    """For each other source and each fitted FNR, balanced accuracy at that threshold and AUC.

    ``detector`` needs ``score_samples`` and ``thresholds`` (every detector kind); scores are
    computed once per source.
    """
    other_scores = {name: np.asarray(detector.score_samples(samples)) for name, samples in others.items()}
    return evaluate_scores(detector.thresholds, np.asarray(detector.score_samples(generated)), other_scores)


def evaluate_scores(
    thresholds: Mapping[float, float], generated: np.ndarray, others: Mapping[str, np.ndarray],
    other_thresholds: Mapping[str, Mapping[float, float]] | None = None,
) -> list[PairResult]:
    """:func:`evaluate_pairs` from scores (higher = typical; attributed when ``>= threshold``),
    with ``thresholds`` mapping each FNR target to its score threshold; ``other_thresholds``, per
    other source, the thresholds its items were judged against where they differ (items scored as
    lossless: :meth:`~flipad.detectors.base.Detector.score_lossless`)."""
    generated = np.asarray(generated, dtype=np.float64)
    results = []
    for name, scores in others.items():
        scores = np.asarray(scores, dtype=np.float64)
        labels = np.r_[np.ones(len(generated)), np.zeros(len(scores))]
        auc = float(roc_auc_score(labels, np.r_[generated, scores]))
        theirs = (other_thresholds or {}).get(name, thresholds)
        for fnr, threshold in thresholds.items():
            gen_ok, other_ok = generated >= threshold, scores >= theirs[fnr]
            results.append(
                PairResult(
                    source=name,
                    fnr_target=float(fnr),
                    balanced_accuracy=balanced_accuracy(gen_ok, other_ok),
                    auc=auc,
                    true_positives=int(gen_ok.sum()),
                    false_negatives=int((~gen_ok).sum()),
                    true_negatives=int((~other_ok).sum()),
                    false_positives=int(other_ok.sum()),
                )
            )
    return results
