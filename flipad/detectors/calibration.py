"""Decisions with stated error rates, shared by every detector.

A detector supplies ``anomaly_scores`` (small = typical of the generator). Thresholds are the
(1 - FNR) quantiles of the scores of held-out validation samples of the generator; each comes
with a one-sided Clopper-Pearson bound on the true FNR, and every item can get an empirical
p-value against those held-out scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.stats
import torch

__all__ = ["CalibratedDetector", "NotFittedError", "empirical_p_values", "fnr_upper_bound"]


class NotFittedError(RuntimeError):
    """An inference method was called before ``fit``."""


def empirical_p_values(reference: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``(1 + #{reference >= s}) / (1 + n)``: how typical anomaly score ``s`` is of the reference set."""
    ref = torch.sort(reference.double()).values
    above = len(ref) - torch.searchsorted(ref, scores.double(), right=False)
    return (1 + above).double() / (1 + len(ref))


def fnr_upper_bound(exceedances: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on the true FNR given ``exceedances`` of ``n`` held-out samples."""
    if exceedances >= n:
        return 1.0
    return float(scipy.stats.beta.ppf(confidence, exceedances + 1, n - exceedances))


def check_fnr(fnr: Sequence[float]) -> tuple[float, ...]:
    """The FNR targets as a tuple, each in (0, 1)."""
    fnr = tuple(float(f) for f in fnr)
    if not fnr or any(not 0 < f < 1 for f in fnr):
        raise ValueError(f"fnr values must lie in (0, 1), got {fnr}")
    return fnr


class CalibratedDetector:
    """The scikit-learn style decision surface on top of ``anomaly_scores``.

    Subclasses set ``fnr`` in ``__init__``, implement ``anomaly_scores`` and call
    ``_calibrate(validation_scores)`` at the end of ``fit``.
    """

    fnr: tuple[float, ...]

    def anomaly_scores(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_fitted(self) -> None:
        if not hasattr(self, "thresholds_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit() or load()")

    def _calibrate(self, validation_scores: torch.Tensor, conditions: dict[str, torch.Tensor] | None = None) -> None:
        """Thresholds from held-out scores of the generator's samples. ``conditions``: scores of
        the same kind of samples after each perturbation content meets (JPEG re-saves, ...); each
        threshold is then the largest of the per-condition quantiles, so the FNR target holds for
        pristine and for every perturbed condition, and its upper bound is the worst condition's."""
        scores = validation_scores.detach().double().cpu()
        if torch.unique(scores).numel() < 2:
            raise ValueError("scores are constant on the validation samples: the detector learned nothing")
        self.validation_scores_ = scores
        self.condition_scores_ = {k: v.detach().double().cpu() for k, v in (conditions or {}).items()}
        every = {"pristine": scores, **self.condition_scores_}
        self.thresholds_ = {f: max(float(torch.quantile(s, 1 - f)) for s in every.values()) for f in self.fnr}
        self.fnr_upper_bounds_ = {
            f: max(fnr_upper_bound(int((s > t).sum()), len(s)) for s in every.values()) for f, t in self.thresholds_.items()
        }
        self.offset_ = -self.thresholds_[self.fnr[0]]

    def score_samples(self, samples: np.ndarray | torch.Tensor) -> np.ndarray:
        """Higher = more typical of this generator (the negated anomaly score)."""
        return -self.anomaly_scores(samples).double().numpy()

    def threshold(self, fnr: float | None = None) -> float:
        """The anomaly-score threshold for a tolerable FNR (one of those given at fit time)."""
        self._check_fitted()
        fnr = self.fnr[0] if fnr is None else fnr
        if fnr not in self.thresholds_:
            raise ValueError(f"no threshold for FNR {fnr}; fitted FNRs are {sorted(self.thresholds_)}")
        return self.thresholds_[fnr]

    def decision_function(self, samples: np.ndarray | torch.Tensor, fnr: float | None = None) -> np.ndarray:
        """``score_samples - offset``: non-negative means attributed to this generator."""
        return self.score_samples(samples) + self.threshold(fnr)

    def predict(self, samples: np.ndarray | torch.Tensor, fnr: float | None = None) -> np.ndarray:
        """Bool per sample: made by this generator (at the threshold for ``fnr``, default the first)."""
        return self.decision_function(samples, fnr) >= 0

    def p_values(self, samples: np.ndarray | torch.Tensor) -> np.ndarray:
        """Empirical p-value of each sample against the generator's held-out scores (small = not its own)."""
        return empirical_p_values(self.validation_scores_, self.anomaly_scores(samples)).numpy()
