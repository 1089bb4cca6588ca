"""The detector contract: every kind through one surface, and detectors saved before it still load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flipad import DETECTOR_KINDS, Detector, load_bundle

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("kind", ["flipad", "reconstruction", "attribution"])
def test_bundles_saved_before_the_contract_load_and_score_identically(kind):
    """tests/data/legacy-*: saved by the code before the detector contract (commit f636744)."""
    expected = json.loads((DATA / "legacy.json").read_text())[kind]
    probe = np.load(DATA / "legacy_probe.npy")
    detector = load_bundle(DATA / f"legacy-{kind}", device="cpu")
    assert detector.kind == kind and isinstance(detector, Detector)
    assert detector.thresholds_[detector.fnr[0]] == pytest.approx(expected["threshold"], rel=1e-9)
    np.testing.assert_allclose(detector.score_samples(probe), expected["score_samples"], rtol=1e-5, atol=1e-7)
    scores = detector.score(probe)
    np.testing.assert_allclose(scores.score, expected["score_samples"], rtol=1e-5, atol=1e-7)
    assert scores.threshold == pytest.approx(-expected["threshold"], rel=1e-9)
    assert (scores.is_generated() == (scores.score >= scores.threshold)).all()
    assert scores.is_generated()[:6].sum() > scores.is_generated()[6:].sum()  # own samples first, then noise


def test_every_kind_is_registered_with_a_description():
    assert {"flipad", "reconstruction", "attribution"} <= set(DETECTOR_KINDS)
    for kind, cls in DETECTOR_KINDS.items():
        assert cls.kind == kind and cls.description
