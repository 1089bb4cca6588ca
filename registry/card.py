"""The model card of a detector version: what a reviewer needs without reading code (markdown)."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

__all__ = ["model_card"]


def model_card(
    name: str,
    headline: str,
    description: str,
    generator: Mapping[str, object],
    data: Mapping[str, str],
    metrics: Mapping[str, float],
    results: pd.DataFrame,
    reproduce: str,
) -> str:
    """Markdown: the headline (worst source), the generator's fingerprint, the data (sha256 per set),
    the thresholds, the per-source table at the first FNR target, the recompressed own variants
    and the command that reproduces the version."""
    first = results["fnr_target"].min() if len(results) else None
    rows = results[results["fnr_target"] == first] if first is not None else results
    sources = "\n".join(
        f"| {r.source} | {r.balanced_accuracy:.4f} | {r.auc:.4f} | {r.true_positives}/{r.true_positives + r.false_negatives} "
        f"| {r.false_positives}/{r.true_negatives + r.false_positives} |" for r in rows.itertuples())
    variants = "\n".join(f"| {k.removeprefix('own_accepted_').rsplit('_fnr', 1)[0]} | {v:.3f} |"
                         for k, v in sorted(metrics.items()) if k.startswith("own_accepted_") and
                         k.endswith(f"_fnr{first:g}"))
    thresholds = ", ".join(f"FNR {k.removeprefix('threshold_fnr')}: {v:.4g}" for k, v in metrics.items()
                           if k.startswith("threshold_fnr"))
    unaltered = ", ".join(f"FNR {k.removeprefix('threshold_unaltered_fnr')}: {v:.4g}" for k, v in metrics.items()
                          if k.startswith("threshold_unaltered_fnr"))
    undecided = ", ".join(f"{k.removeprefix('undecided_')} {v:.3f}" for k, v in sorted(metrics.items())
                          if k.startswith("undecided_"))
    lossless = (f"\nItems that arrive lossless with no trace of a JPEG are judged against the unaltered own items' "
                f"thresholds: {unaltered}; between those and the ones above they are undecided (an own item re-saved "
                f"without a trace, or another source). Held-out sets made in memory are scored so; undecided: "
                f"{undecided}.") if unaltered else ""
    bounds = ", ".join(f"FNR {k.removeprefix('validation_fnr_upper95_fnr')}: {v:.4f}" for k, v in metrics.items()
                       if k.startswith("validation_fnr_upper95_fnr"))
    generator_lines = "\n".join(f"- {k}: `{v}`" for k, v in generator.items())
    data_lines = "\n".join(f"- {k}: sha256 `{v[:16]}…`" for k, v in data.items())
    return f"""# {name}: {description}

**{headline}**

## Generator
{generator_lines}

## Decision
Attributed when `score >= threshold` (score: higher = more typical of the generator).
Thresholds: {thresholds}. 95% upper bounds on the FNR from the calibration samples: {bounds}.{lossless}

## Held-out evaluation at FNR {first:g} (one row per other source)
Scored as attribution scores them: a latent search stops once an item's verdict is settled (an
attributed item's loss at most the threshold, a rejected one's above it), so the AUC ranks those
settled scores, exact where the verdict is right; a verdict of several families is scored
exhaustively.

| source | balanced accuracy | AUC | own attributed | source attributed |
|---|---|---|---|---|
{sources}

## The owner's held-out samples after recompression
| variant | attributed |
|---|---|
{variants or '| (not evaluated: onboarded without the open-world sets, or not an 8-bit image generator) | |'}

## Data
{data_lines}

## Reproduce
```
{reproduce}
```
"""
