"""Drift of a scored content stream against the reference saved at onboarding (Evidently).

The reference is the detector's held-out evaluation data (the generator's own samples and real
data), one row per item: ``score``, ``is_generated``, the stages' diagnostics (every registered
kind's, :func:`flipad.kinds.diagnostic_columns`: ``residual``, ``sparsity``, ``latent_loss``, ...)
and ``pixel_mean``/``pixel_std``.

What alarms is trouble, not the stream's mix. A stream that is 90% real content has other score
and pixel distributions than the half-and-half reference although nothing is wrong, so the
reference is first resampled to the stream's attributed share (:func:`mix_matched`): the
attributed and the rejected items are each compared with reference items of the same verdict,
in the stream's proportions. The mix itself (``attributed_fraction``) is reported, never tested.
A stream drifts when at least ``drift_share`` (default 0.3) of the numeric columns drift by
Evidently's per-column tests (K-S / Z-test up to 1,000 rows, Wasserstein / Jensen-Shannon above):
its inputs or its scores have moved away from what the thresholds were calibrated on.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import pandas as pd

from flipad.kinds import diagnostic_columns

__all__ = ["DRIFT_SHARE", "DriftResult", "check_drift", "metric_name", "mix_matched", "monitored_columns"]


def monitored_columns() -> list[str]:
    """The numeric columns compared: the score, every registered kind's diagnostics, the input's pixel statistics."""
    return ["score", *diagnostic_columns(), "pixel_mean", "pixel_std"]


# Two of the (typically four to six) columns a kind fills: with per-column tests at the 5% level a single column drifts by chance
# about a quarter of the time on a same-distribution stream, two rarely.
DRIFT_SHARE = 0.3


@dataclass
class DriftResult:
    """The verdict (``drifted``), per-column statistics and the Evidently snapshot for the HTML report."""

    drifted: bool
    drift_share: float  # share of monitored columns that drifted
    threshold_share: float
    columns: dict[str, dict] = field(default_factory=dict)  # column -> {method, kind, value, threshold, drifted}
    n_reference: int = 0
    n_current: int = 0
    attributed_fraction: float = float("nan")
    reference_attributed_fraction: float = float("nan")
    snapshot: object = None

    def html(self, title: str = "flipad stream drift") -> str:
        """The Evidently report as a standalone HTML page, headed (and titled) by ``title``."""
        page = self.snapshot.get_html_str(as_iframe=False)
        heading = html.escape(title)
        page = page.replace("<head>", f"<head>\n<title>{heading}</title>", 1)
        return page.replace("<body>", f'<body>\n<h2 style="font-family: sans-serif">{heading}</h2>', 1)

    def summary(self) -> dict:
        """Machine-readable verdict (no snapshot)."""
        return {
            "drifted": self.drifted, "drift_share": self.drift_share, "threshold_share": self.threshold_share,
            "n_reference": self.n_reference, "n_current": self.n_current, "attributed_fraction": self.attributed_fraction,
            "reference_attributed_fraction": self.reference_attributed_fraction, "columns": self.columns,
        }


def metric_name(column: str, detail: dict) -> str:
    """The MLflow metric of one column's statistic, named by what it is: ``drift_score_p_value``
    or ``drift_score_distance`` (a p-value drifts when low, a distance when high)."""
    return f"drift_{column}_{detail['kind']}"


def _attributed(frame: pd.DataFrame) -> pd.Series:
    """``is_generated`` as booleans, whether the rows came from parquet (bools) or a CSV (text)."""
    return frame["is_generated"].astype(str).str.lower().isin(["true", "1", "1.0"])


def mix_matched(reference: pd.DataFrame, current: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The largest subsample of ``reference`` whose attributed share equals ``current``'s.

    Attributed and rejected reference items are kept in the stream's proportions, so a stream
    that is mostly real (or mostly generated) content is compared with a reference of the same
    mix. Deterministic for a given ``seed``.
    """
    share = float(_attributed(current).mean())
    generated, rest = reference[_attributed(reference)], reference[~_attributed(reference)]
    if share >= 1.0 or len(rest) == 0:
        return generated
    if share <= 0.0 or len(generated) == 0:
        return rest
    # as many rows as the scarcer side allows, in the stream's proportions
    total = min(len(generated) / share, len(rest) / (1.0 - share))
    n_generated, n_rest = round(total * share), round(total * (1.0 - share))
    return pd.concat([generated.sample(n=n_generated, random_state=seed) if n_generated < len(generated) else generated,
                      rest.sample(n=n_rest, random_state=seed) if n_rest < len(rest) else rest])


def _numeric(frame: pd.DataFrame) -> list[str]:
    return [c for c in monitored_columns() if c in frame.columns and frame[c].notna().any()]


def check_drift(reference: pd.DataFrame, current: pd.DataFrame, drift_share: float = DRIFT_SHARE) -> DriftResult:
    """Compare ``current`` rows (successfully scored items) with the mix-matched ``reference`` rows
    over the monitored numeric columns (see the module's docstring)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    cur = current.dropna(subset=["score"])
    ref = mix_matched(reference.dropna(subset=["score"]), cur) if len(cur) else reference.iloc[:0]
    if len(cur) < 2 or len(ref) < 2:
        raise ValueError(f"drift needs at least 2 rows on each side (reference {len(ref)}, current {len(cur)})")
    columns = [c for c in _numeric(ref) if c in _numeric(cur)]
    definition = DataDefinition(numerical_columns=columns)
    snapshot = Report([DataDriftPreset(columns=columns, drift_share=drift_share)]).run(
        current_data=Dataset.from_pandas(cur[columns], data_definition=definition),
        reference_data=Dataset.from_pandas(ref[columns], data_definition=definition),
    )
    per_column: dict[str, dict] = {}
    share = 0.0
    for metric in snapshot.dict()["metrics"]:
        config = metric["config"]
        if config["type"].endswith("DriftedColumnsCount"):
            share = float(metric["value"]["share"])
        elif config["type"].endswith("ValueDrift"):
            value, threshold = float(metric["value"]), float(config["threshold"])
            is_p_value = "p_value" in config["method"]
            per_column[config["column"]] = {
                "method": config["method"], "kind": "p_value" if is_p_value else "distance", "value": value,
                "threshold": threshold,
                "drifted": value < threshold if is_p_value else value >= threshold,
            }
    return DriftResult(
        drifted=share >= drift_share,
        drift_share=share,
        threshold_share=drift_share,
        columns=per_column,
        n_reference=len(ref),
        n_current=len(cur),
        attributed_fraction=float(_attributed(cur).mean()),
        reference_attributed_fraction=float(_attributed(reference).mean()),
        snapshot=snapshot,
    )
