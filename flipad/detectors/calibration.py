"""Decisions with stated error rates, shared by every detector.

A detector supplies a private anomaly score ``_anomaly`` (small = typical of the generator: a
loss, a distance). Thresholds are the (1 - FNR) quantiles of the anomaly scores of held-out
validation samples of the generator; each comes with a one-sided Clopper-Pearson bound on the
true FNR, and every item can get an empirical p-value against those held-out scores.

Everything public is in one convention, the score: higher = more typical, attributed when
``score >= threshold``. :meth:`CalibratedDetector._to_score` is the one place the sign flips.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.stats
import torch

from ..io.perturb import PERTURBATIONS, perturb

__all__ = ["CalibratedDetector", "NotFittedError", "empirical_p_values", "fnr_upper_bound", "lowest_quantile", "search_resaves",
           "search_settled"]


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


def _searched_first(name: str) -> tuple[bool, float]:
    """The order calibration searches re-saves in: JPEG from the lowest quality (the loosest
    quantiles, usually), then the others as given (a stable sort)."""
    kind, strength, _ = PERTURBATIONS[name]
    return kind != "jpeg", strength if kind == "jpeg" else 0.0


def lowest_quantile(losses: torch.Tensor, fnr: Sequence[float]) -> float:
    """The smallest of the (1 - FNR) quantiles of ``losses`` over the FNR targets."""
    return min(float(torch.quantile(losses.double(), 1 - f)) for f in fnr)


def search_settled(search: Callable[[np.ndarray, float], torch.Tensor], items: np.ndarray, level: float,
                   fnr: Sequence[float]) -> torch.Tensor:
    """The trajectories of ``search(items, level)``, which stops each item once its loss is at or
    below ``level``, such that each (1 - FNR) quantile of their final losses is the one searching
    every item to its end gives, wherever that quantile lies above ``level``.

    A stopped item's loss is an upper bound at or below ``level``, so a quantile whose two
    bracketing order statistics lie above ``level`` is exact. Where the lower one is a stopped
    item's and the quantile still lies above ``level``, the items at or below ``level`` are
    searched again to their ends (``search(items, 0.0)``)."""
    trajectories = search(items, level)
    final = trajectories[:, -1].double()
    low = final <= level
    if level <= 0 or not low.any():
        return trajectories
    n = len(final)
    inexact = any(int(low.sum()) > int(np.floor((n - 1) * (1 - f))) and float(torch.quantile(final, 1 - f)) > level
                  for f in fnr)
    if inexact:
        trajectories = trajectories.clone()
        trajectories[low] = search(items[low.numpy()], 0.0).to(trajectories)
    return trajectories


def search_resaves(search: Callable[[str, np.ndarray, float], torch.Tensor], items: np.ndarray,
                   names: Sequence[str], fnr: Sequence[float],
                   accept: float = 0.0) -> tuple[dict[str, torch.Tensor], dict[str, float], float]:
    """The own calibration items' search trajectories after each re-save ``names``, searched so
    that every threshold is what searching each item to its end would set.

    ``search(name, resaved, level)`` runs the search on the re-saved items, stopping each once its
    loss is at or below ``level``. The lowest JPEG quality goes first, down to ``accept`` (0: to
    its end). Every threshold is at least the largest quantile found so far, so an item of a later
    re-save whose loss is already below it is settled: stopping it there leaves every threshold
    as it was (:func:`search_settled`; only the screens, which can only loosen). Returns the
    trajectories (in ``names``' order), the level each re-save was searched down to, and the
    largest quantile found (where a later set may stop)."""
    trajectories, searched_until = {}, {}
    for name in sorted(names, key=_searched_first):
        trajectories[name] = search_settled(lambda x, level, name=name: search(name, x, level), perturb(items, name),
                                            accept, fnr)
        searched_until[name] = accept
        accept = max(accept, lowest_quantile(trajectories[name][:, -1], fnr))
    return {name: trajectories[name] for name in names}, searched_until, accept


def check_fnr(fnr: Sequence[float]) -> tuple[float, ...]:
    """The FNR targets as a tuple, each in (0, 1)."""
    fnr = tuple(float(f) for f in fnr)
    if not fnr or any(not 0 < f < 1 for f in fnr):
        raise ValueError(f"fnr values must lie in (0, 1), got {fnr}")
    return fnr


class CalibratedDetector:
    """The scikit-learn style decision surface on top of a private anomaly score.

    Subclasses set ``fnr`` in ``__init__``, implement ``_anomaly`` and call
    ``_calibrate(validation_anomaly)`` at the end of ``fit``. ``thresholds_`` (learned state, as
    saved) are in the anomaly space; :attr:`thresholds` and :meth:`threshold` in the score space.
    """

    fnr: tuple[float, ...]

    def _anomaly(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Per sample, small = typical of the generator (a loss, a distance): private."""
        raise NotImplementedError

    @staticmethod
    def _to_score(anomaly: torch.Tensor | np.ndarray | float) -> Any:
        """The score of an anomaly score (higher = more typical): the one flip of sign."""
        if isinstance(anomaly, float):
            return -anomaly
        return -torch.as_tensor(anomaly).double().cpu().numpy()

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
        self.offset_ = self.threshold()

    def score_samples(self, samples: np.ndarray | torch.Tensor) -> np.ndarray:
        """Higher = more typical of this generator."""
        return self._to_score(self._anomaly(samples))

    @property
    def thresholds(self) -> dict[float, float]:
        """The score threshold per FNR target (attributed when ``score >= threshold``)."""
        self._check_fitted()
        return {f: self._to_score(float(t)) for f, t in self.thresholds_.items()}

    def threshold(self, fnr: float | None = None) -> float:
        """The score threshold for a tolerable FNR (one of those given at fit time; default the first)."""
        fnr = self.fnr[0] if fnr is None else fnr
        thresholds = self.thresholds
        if fnr not in thresholds:
            raise ValueError(f"no threshold for FNR {fnr}; fitted FNRs are {sorted(thresholds)}")
        return thresholds[fnr]

    def decision_function(self, samples: np.ndarray | torch.Tensor, fnr: float | None = None) -> np.ndarray:
        """``score_samples - threshold``: non-negative means attributed to this generator."""
        return self.score_samples(samples) - self.threshold(fnr)

    def predict(self, samples: np.ndarray | torch.Tensor, fnr: float | None = None) -> np.ndarray:
        """Bool per sample: made by this generator (at the threshold for ``fnr``, default the first)."""
        return self.decision_function(samples, fnr) >= 0

    def p_values(self, samples: np.ndarray | torch.Tensor) -> np.ndarray:
        """Empirical p-value of each sample against the generator's held-out scores (small = not its own)."""
        return empirical_p_values(self.validation_scores_, self._anomaly(samples)).numpy()
