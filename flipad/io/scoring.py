"""Scoring raw items (encoded bytes) with a fitted detector: one result per item, errors kept per item."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..detectors.bundle import Detector, flipad_family
from .data import DataError, decode_item, pixel_stats
from ..detectors.features import FeatureExtractor

__all__ = ["ItemResult", "score_items"]

NAN = float("nan")


@dataclass(frozen=True)
class ItemResult:
    """``score`` is higher for items more typical of the generator; attributed when ``score >= threshold``.

    ``residual`` and ``sparsity`` describe the inversion, ``pixel_mean``/``pixel_std`` the input
    (the summaries drift monitoring compares); NaN where they do not apply or the item failed.
    """

    score: float | None
    threshold: float
    is_generated: bool | None
    error: str = ""
    residual: float = NAN
    sparsity: float = NAN
    pixel_mean: float = NAN
    pixel_std: float = NAN


def score_items(detector: Detector, items: Sequence[bytes]) -> list[ItemResult]:
    """Decode each item for the detector's generator and score the decodable ones in batches.

    Items that cannot be decoded or have the wrong shape get an ``error`` and no score; they never
    stop the others. The threshold is the detector's default (its first FNR target). Works for
    every detector kind; the inversion diagnostics come from the FLIPAD family where there is one.
    """
    threshold = -detector.threshold()
    results: list[ItemResult | None] = [None] * len(items)
    groups: dict[bool, list[tuple[int, np.ndarray]]] = {}
    for i, data in enumerate(items):
        try:
            arr = decode_item(data, detector.output_shape)
        except DataError as exc:
            results[i] = ItemResult(None, threshold, None, str(exc))
            continue
        groups.setdefault(arr.dtype == np.uint8, []).append((i, arr))
    for members in groups.values():  # 8-bit pixels and output-range floats are scored apart
        batch = np.stack([arr for _, arr in members])
        scores, residual, sparsity = _scores(detector, batch)
        pixel_mean, pixel_std = pixel_stats(batch)
        for k, (i, _) in enumerate(members):
            ok = bool(np.isfinite(scores[k]))
            results[i] = ItemResult(
                float(scores[k]) if ok else None, threshold, bool(scores[k] >= threshold) if ok else None,
                "" if ok else "the detector returned a non-finite score",
                float(residual[k]), float(sparsity[k]), float(pixel_mean[k]), float(pixel_std[k]),
            )
    return results  # type: ignore[return-value]


def _scores(detector: Detector, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores (higher = more typical) and the FLIPAD inversion's residual and sparsity (NaN without FLIPAD)."""
    flipad = flipad_family(detector)
    if flipad is None:
        nan = np.full(len(batch), NAN)
        return detector.score_samples(batch), nan, nan
    # a private extractor per call: the flow scores batches in threads, and the inversion
    # diagnostics it keeps must be this batch's
    extractor = FeatureExtractor(flipad.generators.adapter, flipad.feature_config)
    flipad_scores = flipad.score_features(extractor(batch))
    inversion = extractor.last_inversion
    anomaly = flipad_scores if flipad is detector else detector.anomaly_scores(batch, flipad_scores=flipad_scores)
    residual = inversion.residual.double().numpy() if inversion is not None else np.full(len(batch), NAN)
    sparsity = inversion.sparsity.numpy() if inversion is not None else np.full(len(batch), NAN)
    return -anomaly.double().numpy(), residual, sparsity
