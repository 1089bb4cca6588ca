"""FlipadDetector: the estimator contract, thresholds, persistence, feature kinds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import VectorLatentGenerator

from flipad import FeatureConfig, FlipadDetector, GeneratorAdapter, NotFittedError
from flipad.detectors.calibration import empirical_p_values, fnr_upper_bound
from flipad.detectors.deepsad import DeepSADConfig
from flipad.detectors.features import FeatureExtractor

FAST_SAD = DeepSADConfig(epochs=4, lr_milestones=(3,))
FAST_INVERSION = {"method": "fista", "max_iter": 150, "continuation_stages": 2, "stage_iters": 50}


def _adapter(seed: int) -> GeneratorAdapter:
    torch.manual_seed(seed)
    return GeneratorAdapter.from_module(VectorLatentGenerator().eval(), latent_shape=(16,), device="cpu", anchor_samples=500)


@pytest.fixture(scope="module")
def own_and_other():
    return _adapter(1), _adapter(2)


@pytest.mark.parametrize("kind", ["raw", "dct", "flipad"])
def test_fit_score_predict_for_each_feature_kind(own_and_other, kind):
    own, other = own_and_other
    features = FeatureConfig(kind=kind, inversion=FAST_INVERSION)
    det = FlipadDetector(own, features=features, n_generated=300, n_validation=300, deep_sad=FAST_SAD, progress=False)
    assert det.fit(real=other.generate(300, seed=5)) is det
    mine, theirs = own.generate(200, seed=50), other.generate(200, seed=51)
    scores_mine, scores_theirs = det.score_samples(mine), det.score_samples(theirs)
    assert np.std(scores_mine) > 0
    assert np.median(scores_mine) > np.median(scores_theirs)
    decision = det.decision_function(mine)
    np.testing.assert_array_equal(det.predict(mine), decision >= 0)
    np.testing.assert_allclose(decision, scores_mine - det.offset_, rtol=1e-6)
    p = det.p_values(theirs)
    assert np.all((p > 0) & (p <= 1))


def test_empirical_fnr_is_near_the_target(own_and_other):
    own, other = own_and_other
    det = FlipadDetector(own, features="raw", fnr=(0.05, 0.2), n_generated=500, n_validation=1000,
                         deep_sad=FAST_SAD, progress=False).fit(real=other.generate(500, seed=9))
    held_out = own.generate(1000, seed=77)
    fnr = 1 - det.predict(held_out).mean()
    assert 0.015 <= fnr <= 0.1, fnr
    fnr20 = 1 - det.predict(held_out, fnr=0.2).mean()
    assert 0.12 <= fnr20 <= 0.28, fnr20
    assert det.thresholds_[0.2] < det.thresholds_[0.05]
    assert 0.05 < det.fnr_upper_bounds_[0.05] < 0.08
    with pytest.raises(ValueError, match="no threshold for FNR"):
        det.threshold(0.3)


def test_not_fitted_and_bad_arguments(own_and_other):
    own, _ = own_and_other
    det = FlipadDetector(own, features="raw")
    with pytest.raises(NotFittedError):
        det.predict(own.generate(2))
    with pytest.raises(ValueError, match="needs negatives"):
        det.fit()
    with pytest.raises(ValueError, match="fnr values"):
        FlipadDetector(own, fnr=(0.0,)).fit(real=own.generate(4))


def test_save_and_load_round_trip(tmp_path, own_and_other):
    own, other = own_and_other
    features = FeatureConfig(kind="flipad", inversion=FAST_INVERSION)
    det = FlipadDetector(own, features=features, n_generated=200, n_validation=200, deep_sad=FAST_SAD,
                         progress=False).fit(real=other.generate(200, seed=3))
    det.save(tmp_path / "det")
    assert sorted(p.name for p in (tmp_path / "det").iterdir()) == ["config.json", "tensors.safetensors"]
    fresh = GeneratorAdapter.from_module(own.module, latent_shape=(16,), device="cpu", anchor_samples=10)
    loaded = FlipadDetector.load(tmp_path / "det", fresh)
    samples = other.generate(20, seed=4)
    np.testing.assert_allclose(loaded.score_samples(samples), det.score_samples(samples), rtol=1e-5, atol=1e-6)
    assert loaded.thresholds_ == det.thresholds_
    with pytest.raises(ValueError, match="was fitted for generator"):
        FlipadDetector.load(tmp_path / "det", other)
    with pytest.raises(ValueError, match="does not hold a saved flipad detector"):
        FlipadDetector.load(tmp_path, own)


def test_p_values_and_fnr_bound():
    ref = torch.arange(1, 100, dtype=torch.float32)
    p = empirical_p_values(ref, torch.tensor([0.0, 50.0, 1000.0]))
    assert p[0] == 1.0 and p[2] == pytest.approx(1 / 100) and 0.4 < p[1] < 0.6
    assert fnr_upper_bound(0, 1000) == pytest.approx(1 - 0.05 ** (1 / 1000), rel=1e-6)
    assert fnr_upper_bound(5, 1000) > 0.005


def _upsampling_adapter() -> GeneratorAdapter:
    torch.manual_seed(4)
    module = torch.nn.Sequential(
        torch.nn.Linear(16, 4 * 8 * 8), torch.nn.Unflatten(1, (4, 8, 8)), torch.nn.ReLU(),
        torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(4, 1, 3, padding=1), torch.nn.Tanh(),
    )
    return GeneratorAdapter.from_module(module, latent_shape=(16,), device="cpu", anchor_samples=50)


def test_automatic_pooling_follows_the_papers_rule():
    """Activations as large as the output (stride-1 final conv after upsampling, not folded) are
    max-pooled by 2; a ConvTranspose2d's half-size activations are kept; explicit values and saved
    configs win. Folding (the default) recovers the half-size map before upsampling directly."""
    convt, upsampled = _adapter(1), _upsampling_adapter()  # both: 4x8x8 activations before the last layer
    for adapter, fold in ((convt, True), (upsampled, True), (upsampled, False)):
        extractor = FeatureExtractor(adapter, FeatureConfig(fold_upsampling=fold, inversion=FAST_INVERSION))
        assert tuple(extractor(adapter.generate(3, seed=0)).shape[1:]) == (4, 8, 8)
    acts = torch.randn(2, 4, 16, 16)
    unfolded = FeatureConfig(fold_upsampling=False)
    assert torch.equal(FeatureExtractor(upsampled, unfolded)._reshape_activations(acts), F.max_pool2d(acts, 2))
    assert FeatureExtractor(upsampled, FeatureConfig(pool=None))._reshape_activations(acts).shape[-1] == 16
    saved = {**FeatureConfig().to_dict(), "pool": None}
    del saved["fold_upsampling"]
    assert FeatureConfig.from_dict(saved) == FeatureConfig(pool=None, fold_upsampling=False)
    with pytest.raises(ValueError, match="pool must be"):
        FeatureConfig(pool="max")


def test_folded_detector_saves_and_loads_its_own_anchor(tmp_path):
    upsampled = _upsampling_adapter()
    other = _adapter(2)
    features = FeatureConfig(inversion=FAST_INVERSION)
    det = FlipadDetector(upsampled, features=features, n_generated=200, n_validation=200, deep_sad=FAST_SAD,
                         progress=False).fit(real=other.generate(200, seed=3))
    assert tuple(det.extractor_.inversion_adapter.anchor.shape) == (4, 8, 8)
    det.save(tmp_path / "det")
    fresh = GeneratorAdapter.from_module(upsampled.module, latent_shape=(16,), device="cpu", anchor_samples=10)
    loaded = FlipadDetector.load(tmp_path / "det", fresh)
    assert torch.equal(loaded.extractor_.inversion_adapter.anchor, det.extractor_.inversion_adapter.anchor)
    samples = other.generate(20, seed=4)
    np.testing.assert_allclose(loaded.score_samples(samples), det.score_samples(samples), rtol=1e-5, atol=1e-6)
