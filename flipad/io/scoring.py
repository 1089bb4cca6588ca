"""Scoring raw items (encoded bytes) with a fitted detector: one result per item, errors kept per item."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from ..detectors.base import Detector
from .data import DataError, decode_item, pixel_stats

__all__ = ["ItemResult", "ITEM_COLUMNS", "score_items"]

NAN = float("nan")


@dataclass(frozen=True)
class ItemResult:
    """``score`` is higher for items more typical of the generator; attributed when ``score >= threshold``.

    ``residual`` and ``sparsity`` describe the final-layer inversion, ``latent_loss`` the latent
    search, ``pixel_mean``/``pixel_std`` the input (the summaries drift monitoring compares); NaN
    where they do not apply or the item failed.
    """

    score: float | None
    threshold: float
    is_generated: bool | None
    error: str = ""
    residual: float = NAN
    sparsity: float = NAN
    latent_loss: float = NAN
    pixel_mean: float = NAN
    pixel_std: float = NAN

    def as_row(self) -> dict:
        """The result as the columns :data:`ITEM_COLUMNS` of an output row."""
        return asdict(self)


ITEM_COLUMNS = [f.name for f in fields(ItemResult)]


def score_items(detector: Detector, items: Sequence[bytes]) -> list[ItemResult]:
    """Decode each item for the detector's generator and score the decodable ones in batches.

    Items that cannot be decoded or have the wrong shape get an ``error`` and no score; they never
    stop the others. The threshold is the detector's default (its first FNR target). Works for
    every detector kind.
    """
    threshold = -detector.threshold()
    results: list[ItemResult | None] = [None] * len(items)
    groups: dict[bool, list[tuple[int, np.ndarray]]] = {}
    for i, data in enumerate(items):
        try:
            arr = decode_item(data, detector.output_shape, value_range=detector.sample_range)
        except DataError as exc:
            results[i] = ItemResult(None, threshold, None, str(exc))
            continue
        groups.setdefault(arr.dtype == np.uint8, []).append((i, arr))
    for members in groups.values():  # 8-bit pixels and output-range floats are scored apart
        batch = np.stack([arr for _, arr in members])
        try:
            scores = detector.score(batch)
        except (RuntimeError, ValueError) as exc:  # e.g. out of memory: these items fail, the request does not
            message = f"scoring failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
            for i, _ in members:
                results[i] = ItemResult(None, threshold, None, message)
            continue
        pixel_mean, pixel_std = pixel_stats(batch)
        nan = np.full(len(batch), NAN)
        diagnostics = {k: scores.diagnostics.get(k, nan) for k in ("residual", "sparsity", "latent_loss")}
        for k, (i, _) in enumerate(members):
            value = scores.score[k]
            ok = bool(np.isfinite(value))
            results[i] = ItemResult(
                float(value) if ok else None, threshold, bool(value >= threshold) if ok else None,
                "" if ok else "the detector returned a non-finite score",
                *(float(diagnostics[name][k]) for name in ("residual", "sparsity", "latent_loss")),
                float(pixel_mean[k]), float(pixel_std[k]),
            )
    return results  # type: ignore[return-value]
