"""Deep SAD: the loss pulls normals in and pushes negatives out; training is seeded and deterministic."""

from __future__ import annotations

import pytest
import torch

from flipad.detectors.deepsad import (
    ANOMALY,
    NORMAL,
    DeepSADConfig,
    DeepSADTrainer,
    LeNetEncoder,
    deep_sad_loss,
)

CPU = torch.device("cpu")


def _blobs(n=300, dim=8, shift=2.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, dim, generator=gen)
    anomaly = torch.randn(n, dim, generator=gen) + shift
    x = torch.cat([normal, anomaly])
    labels = torch.cat([torch.full((n,), NORMAL), torch.full((n,), ANOMALY)])
    return x, labels


def test_loss_terms():
    center = torch.zeros(2)
    emb = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    assert deep_sad_loss(emb, center, torch.tensor([NORMAL, NORMAL])).item() == pytest.approx(2.5)
    inv = deep_sad_loss(emb, center, torch.tensor([ANOMALY, ANOMALY]), eps=0.0).item()
    assert inv == pytest.approx((1 / 1 + 1 / 4) / 2)


def test_training_separates_normals_from_anomalies():
    x, labels = _blobs()
    trainer = DeepSADTrainer(DeepSADConfig(epochs=15, lr_milestones=(10,)), CPU)
    net, center = trainer.fit(x, labels, progress=False)
    test_x, test_labels = _blobs(seed=1)
    scores = trainer.distances(net, center, test_x)
    normal, anomaly = scores[test_labels == NORMAL], scores[test_labels == ANOMALY]
    assert scores.std() > 0
    assert normal.median() * 10 < anomaly.median()
    # the loss pulled normals closer than they were at initialisation
    fresh = DeepSADTrainer(DeepSADConfig(epochs=0), CPU).fit(x, labels, progress=False)
    fresh_scores = trainer.distances(*fresh, test_x)
    assert normal.mean() < fresh_scores[test_labels == NORMAL].mean()


def test_training_is_deterministic_on_cpu():
    x, labels = _blobs(n=100)
    cfg = DeepSADConfig(epochs=3, seed=7)
    a = DeepSADTrainer(cfg, CPU)
    b = DeepSADTrainer(cfg, CPU)
    sa = a.distances(*a.fit(x, labels, progress=False), x)
    sb = b.distances(*b.fit(x, labels, progress=False), x)
    assert torch.equal(sa, sb)


def test_center_coordinates_are_pushed_away_from_zero():
    x, labels = _blobs(n=50)
    trainer = DeepSADTrainer(DeepSADConfig(), CPU)
    from flipad.detectors.deepsad import build_encoder

    center = trainer.init_center(build_encoder((8,)), x, labels)
    assert torch.all(center.abs() >= 0.1 - 1e-7)


def test_non_finite_features_are_refused():
    x, labels = _blobs(n=20)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        DeepSADTrainer(DeepSADConfig(epochs=1), CPU).fit(x, labels, progress=False)


def test_lenet_encoder_is_bias_free():
    net = LeNetEncoder((32, 16, 16))
    assert all(getattr(m, "bias", None) is None for m in net.modules() if getattr(m, "weight", None) is not None)
    assert net(torch.randn(2, 32, 16, 16)).shape == (2, 128)


def test_channels_last_training_is_the_same_network_and_returns_the_default_layout():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 8, 8, generator=gen)
    labels = torch.where(torch.arange(64) % 2 == 0, NORMAL, ANOMALY)
    scores = {}
    for layout in (False, True):
        trainer = DeepSADTrainer(DeepSADConfig(epochs=2, batch_size=16, channels_last=layout), CPU)
        net, center = trainer.fit(x, labels, progress=False)
        assert all(p.is_contiguous() for p in net.parameters())  # safetensors saves it as it is
        scores[layout] = trainer.distances(net, center, x)
    torch.testing.assert_close(scores[True], scores[False], rtol=1e-3, atol=1e-5)
