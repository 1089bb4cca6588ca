"""Scoring raw items (encoded bytes) with a fitted detector: one result per item, errors kept per item."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .calibration import CalibratedDetector
from .data import DataError, decode_item

__all__ = ["ItemResult", "score_items"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ItemResult:
    """``score`` is higher for items more typical of the generator; attributed when ``score >= threshold``."""

    score: float | None
    threshold: float
    is_generated: bool | None
    error: str = ""


def score_items(detector: CalibratedDetector, items: Sequence[bytes], shape: Sequence[int]) -> list[ItemResult]:
    """Decode each item for a generator of output ``shape`` and score the decodable ones in one batch.

    Items that cannot be decoded or have the wrong shape get an ``error`` and no score; they never
    stop the others. The threshold is the detector's default (its first FNR target).
    """
    threshold = -detector.threshold()
    arrays: list[np.ndarray] = []
    positions: list[int] = []
    results: list[ItemResult | None] = [None] * len(items)
    for i, data in enumerate(items):
        try:
            arrays.append(decode_item(data, shape))
            positions.append(i)
        except DataError as exc:
            results[i] = ItemResult(None, threshold, None, str(exc))
    by_kind: dict[bool, list[int]] = {}
    for k, arr in enumerate(arrays):
        by_kind.setdefault(arr.dtype == np.uint8, []).append(k)
    for members in by_kind.values():  # pixels and output-range floats are scored apart
        scores = detector.score_samples(np.stack([arrays[k] for k in members]))
        for k, score in zip(members, scores):
            ok = bool(np.isfinite(score))
            results[positions[k]] = ItemResult(
                float(score) if ok else None, threshold, bool(score >= threshold) if ok else None,
                "" if ok else "the detector returned a non-finite score",
            )
    return results  # type: ignore[return-value]
