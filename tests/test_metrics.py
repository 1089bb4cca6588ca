"""The reconstruction metrics: the JPEG-step metric's exact values, its floor, and its errors."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch

from flipad.inversion.latent import ReconstructionConfig
from flipad.inversion.metrics import ResidualMetric
from flipad.io.perturb import perturb

GREY = (1, 32, 32)
STEP = 2 / 255  # one 8-bit step in [-1, 1]


def test_a_constant_residual_weighs_as_the_dc_step_of_the_luminance_table():
    metric = ResidualMetric("jpeg", GREY, (-1.0, 1.0))
    # d steps everywhere: each 8x8 block's DC coefficient is 8 d (orthonormal DCT), its step 16
    for d in (0.5, 1.0, 3.0):
        residual = torch.full((2, *GREY), d * STEP, dtype=torch.float64)
        np.testing.assert_allclose(metric(residual).numpy(), (8 * d / 16) ** 2 / 64, rtol=1e-9)


def test_high_frequencies_weigh_less_than_low_ones_of_the_same_mse():
    metric = ResidualMetric("jpeg", GREY, (-1.0, 1.0))
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    checkerboard = ((-1.0) ** (rows + cols)).to(torch.float64)[None, None] * STEP
    constant = torch.full_like(checkerboard, STEP)
    mse = ResidualMetric("mse", GREY, (-1.0, 1.0))
    np.testing.assert_allclose(mse(checkerboard), mse(constant))
    # the checkerboard is nearly all in the highest-frequency coefficient (step 99) against 16
    assert metric(constant) > 20 * metric(checkerboard)


def test_the_floor_is_the_metric_of_8bit_rounding_noise():
    gen = torch.Generator().manual_seed(0)
    for shape, output_range in ((GREY, (-1.0, 1.0)), ((3, 20, 28), (0.0, 1.0))):
        metric = ResidualMetric("jpeg", shape, output_range)
        step = (output_range[1] - output_range[0]) / 255
        noise = (torch.rand(4000, *shape, generator=gen, dtype=torch.float64) - 0.5) * step
        assert metric(noise).mean() == pytest.approx(metric.floor, rel=0.02)
        assert ResidualMetric("mse", shape, output_range).floor == pytest.approx(step**2 / 12)


def test_a_grey_residual_of_an_rgb_image_is_all_luminance():
    grey, rgb = ResidualMetric("jpeg", GREY, (0.0, 1.0)), ResidualMetric("jpeg", (3, 32, 32), (0.0, 1.0))
    residual = torch.randn(3, *GREY, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / 255
    # Y = 0.299 R + 0.587 G + 0.114 B (weights summing to 1), Cb = Cr = 0; the mean runs over 3 channels
    np.testing.assert_allclose(rgb(residual.repeat(1, 3, 1, 1)).numpy(), grey(residual).numpy() / 3, rtol=1e-5)


def test_a_jpeg_resave_moves_an_image_less_in_the_jpeg_metric_than_a_shift_of_equal_mse(fashion_test):
    images = fashion_test[:20]
    resaved = perturb(images, "jpeg q80")
    metric, mse = ResidualMetric("jpeg", GREY, (0.0, 255.0)), ResidualMetric("mse", GREY, (0.0, 255.0))
    residual = torch.as_tensor(resaved, dtype=torch.float64) - torch.as_tensor(images, dtype=torch.float64)
    shift = torch.ones_like(residual) * mse(residual).sqrt()[:, None, None, None]  # the same MSE, all in DC
    assert (metric(residual) < 0.5 * metric(shift)).all()


def test_bad_metric_settings_are_refused_with_the_option_named():
    with pytest.raises(ValueError, match="unknown reconstruction metric 'l1'"):
        ReconstructionConfig(metric="l1")
    with pytest.raises(ValueError, match="needs \\(C, H, W\\) images.*metric 'mse'"):
        ResidualMetric("jpeg", (64,), (-1.0, 1.0))


def test_configs_saved_before_metrics_keep_the_mse():
    saved = {k: v for k, v in asdict(ReconstructionConfig()).items() if k != "metric"}
    assert ReconstructionConfig.from_dict(saved).metric == "mse"
    assert ReconstructionConfig().metric == "jpeg"
