"""Monitors of an attribution stream, each named by what it protects, each alarm one sentence.

What changes a "was this made by my model?" service's error rates is what alarms; the mix of
own and other content is the stream's business and is reported, never alarmed on. The
reference is what onboarding calibrated and evaluated on (``monitoring/reference.parquet``):
the owner's held-out items pristine and re-saved as the thresholds assume (sources
``generator (held-out)`` and ``generator (held-out) jpeg qNN``), real items, other generators
and the look-alike challengers.

- ``compression`` (the stated FNR): own content arriving more degraded than calibrated crowds
  the attributed items toward the threshold. Watched: the share of attributed items scoring
  below ``b``, the lowest of the calibrated own conditions' 10th percentiles, so any mix of
  calibrated conditions puts at most 10% there.
- ``near-miss`` (the open world): a fine-tuned or copied model piles rejected items up just
  short of the threshold. Watched: the share of rejected items closer to the threshold than
  99% of the reference's rejected real items, other generators and retrained look-alike,
  against the largest share any one of those sources puts there (its 95% upper bound: the
  reference sets are a few hundred items). (The fine-tuned and weight-perturbed challengers are copies of the
  owner's model: what this monitor is for, so not its reference.)
- ``undecided`` (decided items): items outside what the thresholds cover (JPEGs below the
  lowest calibrated quality; lossless items between the unaltered and the re-saved own items'
  thresholds, for families that judge those apart) get no verdict; the sentence names which.
- ``unreadable`` (scored items): error rows, with their commonest reasons.
- ``input-size`` (the input itself): items of another size than the generator makes.

Each monitor is a one-sided exact binomial test of the window's count against the reference
(or tolerated) rate at ``ALPHA`` per window, and alarms only where the observed share is also
at least ``EFFECT`` times that rate: with a stream whose true rate is the reference rate, each
monitor alarms in at most ``ALPHA`` of windows, and five monitors in at most ``5 * ALPHA``.
Windows with fewer than ``MIN_ITEMS`` items a monitor looks at are reported, not tested.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import scipy.stats

from flipad.detectors.calibration import fnr_upper_bound
from flipad.scoring import UNSEEN_RESAVE

__all__ = ["ALPHA", "EFFECT", "MIN_ITEMS", "MONITORS", "MonitorResult", "Tolerances", "report_lines", "run_monitors"]

ALPHA = 1e-3  # false-alarm rate per monitor and window when the stream matches the reference
EFFECT = 2.0  # and the observed share must be at least this many times the reference share
MIN_ITEMS = 20
OWN_PREFIX = "generator (held-out)"
# reference sources that are neither the owner's items nor copies of the owner's model
NEAR_MISS_EXCLUDED = ("lookalike_finetuned", "lookalike_perturbed")
NEAR_SHARE = 0.01  # the near-miss band holds this share of the reference's rejected items


@dataclass(frozen=True)
class Tolerances:
    """Shares of a window the operator accepts where onboarding has no reference: error rows,
    undecided items and items of another size."""

    unreadable: float = 0.02
    undecided: float = 0.05
    input_size: float = 0.01


@dataclass(frozen=True)
class MonitorResult:
    """One monitor over one window: the share it watches (``value``) out of ``n`` items, the
    reference share, the test's p-value, whether it alarms, and the sentence that says so."""

    name: str
    protects: str
    value: float
    reference: float
    n: int
    p_value: float
    alarm: bool
    sentence: str

    def as_dict(self) -> dict:
        return asdict(self)


def _binomial(count: int, n: int, rate: float) -> tuple[float, bool]:
    """One-sided p-value of ``count`` of ``n`` against ``rate``, and whether it alarms."""
    if n < MIN_ITEMS:
        return float("nan"), False
    rate = min(max(rate, 1e-9), 1.0)
    p = float(scipy.stats.binom.sf(count - 1, n, rate))
    return p, bool(p < ALPHA and count / n >= EFFECT * rate)


def _flag(series: pd.Series) -> pd.Series:
    """A boolean column as booleans, whether the rows came from parquet (bools/None) or a CSV (text)."""
    return series.astype(str).str.lower().isin(["true", "1", "1.0"])


def _verdicts(window: pd.DataFrame) -> pd.Series:
    """Each row's verdict; rows written before the verdict column had one are derived."""
    if "verdict" in window and window["verdict"].notna().all():
        return window["verdict"].astype(str)
    derived = np.where(window["error"].fillna("") != "", "error",
                       np.where(_flag(window["is_generated"]), "attributed", "not attributed"))
    return pd.Series(derived, index=window.index)


def _share(count: int, n: int) -> float:
    return count / n if n else float("nan")


def _own(reference: pd.DataFrame) -> dict[str, pd.Series]:
    """The reference's own conditions (pristine and each re-save): the scores of their attributed items."""
    own = reference[reference["source"].astype(str).str.startswith(OWN_PREFIX)]
    return {name: group.loc[_flag(group["is_generated"]), "score"] for name, group in own.groupby("source")}


def compression(reference: pd.DataFrame, window: pd.DataFrame, verdicts: pd.Series, threshold: float,
                tolerances: Tolerances) -> MonitorResult:
    conditions = {k: v for k, v in _own(reference).items() if len(v)}
    attributed = window.loc[verdicts == "attributed", "score"].astype(float)
    protects = "the stated FNR on own items (they arrive as calibrated)"
    if not conditions:
        return MonitorResult("compression", protects, float("nan"), 0.1, len(attributed), float("nan"), False,
                             "no own reference items: not monitored")
    boundary = min(float(np.quantile(v, 0.1)) for v in conditions.values())
    count = int((attributed < boundary).sum())
    p, alarm = _binomial(count, len(attributed), 0.1)
    value = _share(count, len(attributed))
    sentence = (f"own items arrive more degraded (compressed, resized, re-encoded) than calibrated: {value:.0%} of "
                f"attributed items lie in the bottom decile of the calibrated scores (reference at most 10%)" if alarm else
                f"attributed items as calibrated: {value:.1%} in the bottom decile of the calibrated scores (at most 10%)")
    return MonitorResult("compression", protects, value, 0.1, len(attributed), p, alarm, sentence)


def near_miss(reference: pd.DataFrame, window: pd.DataFrame, verdicts: pd.Series, threshold: float,
              tolerances: Tolerances) -> MonitorResult:
    protects = "the open world: no new source close to the generator"
    others = reference[~reference["source"].astype(str).str.startswith(OWN_PREFIX)
                       & ~reference["source"].astype(str).isin(NEAR_MISS_EXCLUDED)]
    reference_rejected = others.loc[~_flag(others["is_generated"]), "score"].astype(float)
    rejected = window.loc[verdicts == "not attributed", "score"].astype(float)
    if len(reference_rejected) < MIN_ITEMS:
        return MonitorResult("near-miss", protects, float("nan"), float("nan"), len(rejected), float("nan"), False,
                             "too few rejected reference items: not monitored")
    # the band: closer to the threshold than all but NEAR_SHARE of the reference's rejected items;
    # its rate is the largest share any one reference source puts there (a stream of real items
    # alone must not alarm), and never below what the reference's size can tell
    edge = float(np.quantile(reference_rejected, 1 - NEAR_SHARE))
    bounds = []
    for _, group in others.groupby("source"):
        scores = group.loc[~_flag(group["is_generated"]), "score"].astype(float)
        if len(scores):  # the source's share, as its 95% upper bound: a reference of 150 items is noisy
            bounds.append(fnr_upper_bound(int((scores >= edge).sum()), len(scores)))
    rate = max(NEAR_SHARE, *bounds)
    count = int(((rejected < threshold) & (rejected >= edge)).sum())
    p, alarm = _binomial(count, len(rejected), rate)
    value = _share(count, len(rejected))
    sentence = (f"a near-miss cluster: {value:.0%} of rejected items lie closer to the threshold than "
                f"{1 - NEAR_SHARE:.0%} of the calibration's real and look-alike items (reference {rate:.1%}): a source "
                f"close to the generator, such as a fine-tuned or copied model, or own items degraded beyond the "
                f"calibration" if alarm else
                f"rejected items as in the reference: {value:.1%} near the threshold (reference {rate:.1%})")
    return MonitorResult("near-miss", protects, value, rate, len(rejected), p, alarm, sentence)


def undecided(reference: pd.DataFrame, window: pd.DataFrame, verdicts: pd.Series, threshold: float,
              tolerances: Tolerances) -> MonitorResult:
    protects = "decided items: the verdict covers what arrives"
    readable = verdicts != "error"
    mask = verdicts == "undecided"
    count, n = int(mask.sum()), int(readable.sum())
    p, alarm = _binomial(count, n, tolerances.undecided)
    value = _share(count, n)
    reasons = window.loc[mask, "reason"].astype(str) if "reason" in window else pd.Series(dtype=str)
    compressed = reasons.str.startswith("JPEG").sum()
    unseen = (reasons == UNSEEN_RESAVE).sum()
    if alarm and compressed >= count / 2:
        sentence = (f"items arrive more compressed than calibrated: {value:.0%} of items are JPEGs below the lowest "
                    f"quality the thresholds cover, left undecided (tolerated {tolerances.undecided:.0%})")
    elif alarm and unseen >= count / 2:
        sentence = (f"{value:.0%} of items are lossless files reconstructed worse than the owner's unaltered items but "
                    f"within what re-saved ones reach, left undecided: own content re-saved without a trace, or a "
                    f"look-alike model (tolerated {tolerances.undecided:.0%})")
    elif alarm:
        sentence = f"more items the verdict cannot decide: {value:.0%} undecided (tolerated {tolerances.undecided:.0%})"
    else:
        sentence = f"{value:.1%} of items undecided (tolerated {tolerances.undecided:.0%})"
    return MonitorResult("undecided", protects, value, tolerances.undecided, n, p, alarm, sentence)


def _reason(error: str) -> str:
    """An error's kind: its text up to the first detail (a parenthesis, colon or number)."""
    for mark in (" (", ":", ";"):
        error = error.split(mark)[0]
    return error.strip()[:60]


def unreadable(reference: pd.DataFrame, window: pd.DataFrame, verdicts: pd.Series, threshold: float,
               tolerances: Tolerances) -> MonitorResult:
    protects = "scored items: content the service can read"
    errors = window.loc[verdicts == "error", "error"].astype(str)
    sized = _other_size(window, reference)
    errors = errors[~sized.reindex(errors.index, fill_value=False)]  # another size is the input-size monitor's
    count, n = len(errors), len(window)
    p, alarm = _binomial(count, n, tolerances.unreadable)
    value = _share(count, n)
    common = "; ".join(f"'{r}' ({k})" for r, k in Counter(map(_reason, errors)).most_common(2))
    sentence = (f"more items cannot be read: {value:.0%} of items are error rows (tolerated {tolerances.unreadable:.0%}); "
                f"commonest: {common}" if alarm else
                f"{value:.1%} of items are error rows (tolerated {tolerances.unreadable:.0%})" + (f": {common}" if common else ""))
    return MonitorResult("unreadable", protects, value, tolerances.unreadable, n, p, alarm, sentence)


def _generator_size(reference: pd.DataFrame, window: pd.DataFrame) -> tuple[float, float] | None:
    """(height, width) the generator makes: from the reference, else the window's commonest scored size."""
    for frame in (reference, window[window["error"].fillna("") == ""] if "error" in window else window):
        if {"height", "width"} <= set(frame.columns):
            sizes = frame[["height", "width"]].dropna()
            if len(sizes):
                return tuple(sizes.value_counts().index[0])  # type: ignore[return-value]
    return None


def _other_size(window: pd.DataFrame, reference: pd.DataFrame) -> pd.Series:
    size = _generator_size(reference, window)
    if size is None or not {"height", "width"} <= set(window.columns):
        return pd.Series(False, index=window.index)
    known = window["height"].notna() & window["width"].notna()
    return known & ((window["height"] != size[0]) | (window["width"] != size[1]))


def input_size(reference: pd.DataFrame, window: pd.DataFrame, verdicts: pd.Series, threshold: float,
               tolerances: Tolerances) -> MonitorResult:
    protects = "the input itself: items of the generator's size"
    other = _other_size(window, reference)
    count, n = int(other.sum()), len(window)
    p, alarm = _binomial(count, n, tolerances.input_size)
    value = _share(count, n)
    size = _generator_size(reference, window)
    sizes = Counter(f"{int(h)}x{int(w)}" for h, w in window.loc[other, ["height", "width"]].itertuples(index=False))
    made = f"{int(size[0])}x{int(size[1])}" if size else "unknown"
    listed = ", ".join(f"{s} ({k})" for s, k in sizes.most_common(3))
    sentence = (f"items of a new size: {value:.0%} of items are {listed} (the generator makes {made}; tolerated "
                f"{tolerances.input_size:.0%})" if alarm else
                f"{value:.1%} of items differ from the generator's {made} (tolerated {tolerances.input_size:.0%})")
    return MonitorResult("input-size", protects, value, tolerances.input_size, n, p, alarm, sentence)


Monitor = Callable[[pd.DataFrame, pd.DataFrame, pd.Series, float, Tolerances], MonitorResult]
MONITORS: dict[str, Monitor] = {"compression": compression, "near-miss": near_miss, "undecided": undecided,
                                "unreadable": unreadable, "input-size": input_size}


def run_monitors(reference: pd.DataFrame, window: pd.DataFrame, tolerances: Tolerances = Tolerances()) -> list[MonitorResult]:
    """Every monitor over ``window`` (one detector version's rows, error rows included) against
    that version's onboarding ``reference``."""
    if not len(window):
        raise ValueError("no rows to monitor")
    scored = pd.to_numeric(window["threshold"], errors="coerce").dropna()
    threshold = float(scored.iloc[0]) if len(scored) else float("nan")
    window = window.reset_index(drop=True).assign(score=pd.to_numeric(window["score"], errors="coerce").to_numpy())
    verdicts = _verdicts(window)
    return [monitor(reference, window, verdicts, threshold, tolerances) for monitor in MONITORS.values()]


def report_lines(name: str, summary: dict, report: str = "") -> list[str]:
    """What a person reads of one model's monitoring summary (the flow's ``drift[name]``): the
    verdict, then each monitor's name, value and sentence."""
    lines = [f"{name}: {'ALARM' if summary['alarm'] else 'no alarm'} ({len(summary['monitors'])} monitors"
             + (f"; Evidently drift report {report}" if report else "") + ")"]
    for monitor in summary["monitors"]:
        state = "ALARM" if monitor["alarm"] else "ok"
        lines.append(f"  {monitor['name']:<12} {state:<5} {monitor['value']:.3f} (reference {monitor['reference']:.3f}, "
                     f"{monitor['n']} items): {monitor['sentence']}")
    return lines
