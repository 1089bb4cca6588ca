"""Scoring raw items (encoded bytes) with a fitted detector of any kind: one result per item, errors kept per
item. It sits above the detectors and the keys, and below nothing of the package."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from .detectors.base import Detector
from .io.data import DataError, ItemInfo, decode_item, item_info, jpeg_history_quality, pixel_stats
from .keys import KeySet, best_matches
from .kinds import diagnostic_columns

__all__ = ["Column", "ItemResult", "UNSEEN_RESAVE", "VERDICTS", "item_columns", "item_schema", "score_items",
           "served_columns", "undecided_reason"]

NAN = float("nan")
# a lossless item whose pixels carry a JPEG's quantisation at a quality up to this was a JPEG
JPEG_HISTORY_ABOVE = 99.0
UNSEEN_RESAVE = ("a lossless item with no trace of a JPEG, which the generator reconstructs worse than its unaltered "
                 "items but within what its re-saved items reach: its own item re-saved without a trace (a PNG of a "
                 "WebP, say) or another source")
# the answers a row can give: the item's verdict, or why there is none
ATTRIBUTED, NOT_ATTRIBUTED, UNDECIDED, ERROR = "attributed", "not attributed", "undecided", "error"
VERDICTS = (ATTRIBUTED, NOT_ATTRIBUTED, UNDECIDED, ERROR)


def _column(dtype: str, meaning: str, served: bool = False, required: bool = True, **default: Any) -> Any:
    """A field of :class:`ItemResult` with its column's type (``double``, ``boolean``, ``string``),
    meaning, whether the served model answers with it and whether it is always filled."""
    return field(**default, metadata={"dtype": dtype, "meaning": meaning, "served": served, "required": required})


@dataclass(frozen=True)
class Column:
    """One column of a row: name, type (``double``, ``boolean``, ``string``), meaning, whether the
    served model answers with it, and whether it is always filled."""

    name: str
    dtype: str
    meaning: str
    served: bool
    required: bool


@dataclass(frozen=True)
class ItemResult:
    """What a detector says about one item: the row schema (:func:`item_schema`), defined here once.

    ``diagnostics`` holds the stages' per-item figures, one column each, named by the registered
    kinds (:func:`~flipad.kinds.diagnostic_columns`; also readable as attributes).
    """

    score: float | None = _column("double", "higher = more typical of the generator; empty on an error", served=True,
                                  required=False)
    threshold: float = _column("double", "attributed when score >= threshold (the first FNR target's)", served=True)
    is_generated: bool | None = _column("boolean", "score >= threshold; empty when undecided or on an error",
                                        served=True, required=False)
    error: str = _column("string", "why the item could not be scored; empty otherwise", served=True, default="")
    diagnostics: dict[str, float] = field(default_factory=dict)
    pixel_mean: float = _column("double", "the input's mean pixel in the generator's output range", default=NAN)
    pixel_std: float = _column("double", "the input's pixel standard deviation", default=NAN)
    verdict: str = _column("string", "attributed, not attributed, undecided or error", served=True, default=ERROR)
    reason: str = _column("string", "why the item is undecided (outside what the thresholds were calibrated on)",
                          served=True, default="")
    format: str = _column("string", "what arrived: png, jpeg, webp, npy, ...", default="")
    height: float = _column("double", "the item's height as it arrived", default=NAN)
    width: float = _column("double", "the item's width as it arrived", default=NAN)
    jpeg_quality: float = _column("double", "the JPEG's quality estimated from its quantisation tables; for another "
                                  "format, of the JPEG its pixels were once saved as, where they show one",
                                  default=NAN)
    key_id: str = _column("string", "the recipient whose key the attributed item carries; empty for no key",
                          served=True, default="")
    key_set: str = _column("string", "the key set version of that recipient", default="")
    key_bits_correct: float = _column("double", "the share of read latent signs agreeing with the recipient's key",
                                      served=True, required=False, default=NAN)
    key_p_value: float = _column("double", "the chance of that agreement without a key", served=True, required=False,
                                 default=NAN)

    def __getattr__(self, name: str) -> Any:
        if name in diagnostic_columns():  # a diagnostic of any registered kind, NaN where it does not apply
            return self.diagnostics.get(name, NAN)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def as_row(self) -> dict:
        """The result as the columns :func:`item_columns` of an output row."""
        row = {}
        for f in fields(self):
            if f.name == "diagnostics":
                row.update({name: self.diagnostics.get(name, NAN) for name in diagnostic_columns()})
            else:
                row[f.name] = getattr(self, f.name)
        return row


def item_schema() -> list[Column]:
    """The columns of a row, in order: the result's fields with ``diagnostics`` spread into one
    column per diagnostic of the registered kinds (double, NaN where a kind has none)."""
    columns: list[Column] = []
    for f in fields(ItemResult):
        if f.name == "diagnostics":
            columns += [Column(name, "double", meaning, False, False) for name, meaning in diagnostic_columns().items()]
        else:
            columns.append(Column(f.name, f.metadata["dtype"], f.metadata["meaning"], f.metadata["served"],
                                  f.metadata["required"]))
    return columns


def item_columns() -> list[str]:
    """The names of :func:`item_schema`'s columns."""
    return [column.name for column in item_schema()]


def served_columns() -> list[Column]:
    """The columns the served model answers with."""
    return [column for column in item_schema() if column.served]


def undecided_reason(info: ItemInfo, lowest_quality: float | None) -> str:
    """Why an item with ``info`` is outside what thresholds calibrated down to JPEG quality
    ``lowest_quality`` cover (empty when it is inside, or when nothing was calibrated)."""
    if lowest_quality is None or not info.jpeg_quality < lowest_quality:
        return ""
    what = "JPEG" if info.format == "jpeg" else f"{info.format.upper() or 'item'} that was a JPEG"
    return (f"{what} of estimated quality {info.jpeg_quality:.0f}, below the lowest the thresholds were calibrated on "
            f"({lowest_quality:.0f}): the stated error rates do not cover it")


def score_items(detector: Detector, items: Sequence[bytes], keysets: Sequence[KeySet] = ()) -> list[ItemResult]:
    """Decode each item for the detector's generator and score the decodable ones in batches.

    Items that cannot be decoded or have the wrong shape get an ``error`` and no score; they never
    stop the others. JPEGs re-saved below the lowest quality the detector's thresholds were
    calibrated on (:meth:`~flipad.detectors.base.Detector.calibrated_jpeg_quality`), and items of
    other formats that still carry such a JPEG's quantisation (a PNG of a JPEG:
    :func:`~flipad.io.data.jpeg_history_quality`), are scored but ``undecided``. Items of a
    lossless format whose pixels carry no JPEG's quantisation at any quality are scored as
    lossless (:meth:`~flipad.detectors.base.Detector.score_lossless`): families that can, judge
    them against their unaltered own items, and one between those and the re-saved own items'
    thresholds is ``undecided``. With ``keysets`` (the generator's key sets, built from the
    owner's secret), attributed items are inverted once more and their recipient read. The
    threshold is the detector's default (its first FNR target), per item as its scoring judged it.
    Works for every detector kind.
    """
    threshold = detector.threshold()
    lowest_quality = detector.calibrated_jpeg_quality()
    results: list[ItemResult | None] = [None] * len(items)
    infos = [item_info(data) for data in items]
    groups: dict[tuple[bool, bool], list[tuple[int, np.ndarray]]] = {}
    for i, data in enumerate(items):
        try:
            arr = decode_item(data, detector.output_shape, value_range=detector.sample_range)
        except DataError as exc:
            results[i] = _result(None, threshold, str(exc), infos[i])
            continue
        pixels = arr.dtype == np.uint8
        if pixels and infos[i].format != "jpeg" and (lowest_quality is not None or infos[i].lossless):
            infos[i] = replace(infos[i], jpeg_quality=jpeg_history_quality(arr, JPEG_HISTORY_ABOVE))
        lossless = infos[i].lossless and not infos[i].jpeg_quality < JPEG_HISTORY_ABOVE
        groups.setdefault((pixels, lossless), []).append((i, arr))
    for (_, lossless), members in groups.items():  # 8-bit pixels and output-range floats are scored apart
        batch = np.stack([arr for _, arr in members])
        try:
            scores = detector.score_lossless(batch) if lossless else detector.score(batch)
        except (RuntimeError, ValueError) as exc:  # e.g. out of memory: these items fail, the request does not
            message = f"scoring failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
            for i, _ in members:
                results[i] = _result(None, threshold, message, infos[i])
            continue
        pixel_mean, pixel_std = pixel_stats(batch)
        between = scores.is_undecided()
        for k, (i, _) in enumerate(members):
            value = scores.score[k]
            ok = bool(np.isfinite(value))
            results[i] = _result(
                float(value) if ok else None, scores.threshold,
                "" if ok else "the detector returned a non-finite score", infos[i],
                undecided_reason(infos[i], lowest_quality) or (UNSEEN_RESAVE if between[k] else ""),
                {"diagnostics": {name: float(values[k]) for name, values in scores.diagnostics.items()},
                 "pixel_mean": float(pixel_mean[k]), "pixel_std": float(pixel_std[k])},
            )
        if keysets:
            _read_keys(detector, members, batch, results, keysets)
    return results  # type: ignore[return-value]


def _read_keys(detector: Detector, members: list, batch: np.ndarray, results: list, keysets: Sequence[KeySet]) -> None:
    """The recipient of each attributed item of ``members`` (rows of ``batch``), into its result."""
    chosen = [k for k, (i, _) in enumerate(members) if results[i].verdict == ATTRIBUTED]
    if not chosen:
        return
    for k, (version, match) in zip(chosen, best_matches(detector.latent_search(), batch[chosen], keysets)):
        i = members[k][0]
        results[i] = replace(results[i], key_id=match.recipient or "", key_set=version,
                             key_bits_correct=float(match.bits_correct), key_p_value=match.p_value)


def _result(score: float | None, threshold: float, error: str, info: ItemInfo, undecided: str = "",
            figures: dict[str, Any] | None = None) -> ItemResult:
    """One item's result: its verdict from the score (none on an error, undecided with a reason)."""
    if error or score is None:
        verdict, is_generated = ERROR, None
    elif undecided:
        verdict, is_generated = UNDECIDED, None
    else:
        is_generated = bool(score >= threshold)
        verdict = ATTRIBUTED if is_generated else NOT_ATTRIBUTED
    size = (float(info.height), float(info.width)) if info.height else (NAN, NAN)
    return ItemResult(score, threshold, is_generated, error, **(figures or {}), verdict=verdict, reason=undecided,
                      format=info.format, height=size[0], width=size[1], jpeg_quality=info.jpeg_quality)
