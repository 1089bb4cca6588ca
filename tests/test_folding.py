"""Nearest upsampling + stride-1 Conv2d folded into one transposed convolution."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flipad import GeneratorAdapter
from flipad.generators.folding import fold_upsampling


def _generator(upsample: nn.Module, conv: nn.Conv2d, channels: int = 3, size: int = 5) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, channels * size * size), nn.Unflatten(1, (channels, size, size)), nn.ReLU(),
                         upsample, conv, nn.Tanh()).eval()


@pytest.mark.parametrize("scale", [2, 3, (2, 3)])
@pytest.mark.parametrize("kernel, padding", [(3, 1), (3, 0), (5, 2), ((3, 5), (1, 0)), (1, 0)])
@pytest.mark.parametrize("bias", [True, False])
def test_folded_layer_equals_conv_of_upsampled_map(scale, kernel, padding, bias):
    module = _generator(nn.Upsample(scale_factor=scale), nn.Conv2d(3, 2, kernel, padding=padding, bias=bias))
    fold = fold_upsampling(module, torch.randn(2, 6), "4")
    assert fold is not None and fold.upsample is module[3] and fold.input_shape == (3, 5, 5)
    h = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(fold.layer(h), module[4](module[3](h)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("upsample, conv", [
    (nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(3, 1, 3, padding=1)),
    (nn.Upsample(scale_factor=2), nn.Conv2d(3, 1, 3, stride=2, padding=1)),
    (nn.Upsample(scale_factor=2), nn.Conv2d(3, 1, 3, padding=1, padding_mode="reflect")),
    (nn.Identity(), nn.Conv2d(3, 1, 3, padding=1)),
])
def test_nothing_to_fold_leaves_the_adapter_as_it_is(upsample, conv):
    adapter = GeneratorAdapter.from_module(_generator(upsample, conv), latent_shape=(6,), device="cpu")
    assert adapter.folded() is adapter
    assert adapter.penultimate_bounds == (0.0, None)  # the ReLU, seen through the upsampling or identity


def test_folded_adapter_inverts_the_map_before_upsampling():
    module = _generator(nn.Upsample(scale_factor=2), nn.Conv2d(3, 1, 3, padding=1))
    adapter = GeneratorAdapter.from_module(module, latent_shape=(6,), device="cpu", anchor_samples=20)
    folded = adapter.folded()
    assert folded is adapter.folded() and folded.penultimate_shape == (3, 5, 5)
    assert adapter.penultimate_shape == (3, 10, 10)
    assert folded.penultimate_bounds == (0.0, None)  # the ReLU before the upsampling
    acts, out = folded.penultimate(adapter.sample_latents(8, seed=1))
    rebuilt = folded.activation.forward(folded.linear_map.forward(acts) + folded.linear_map.bias_map(acts.device))
    torch.testing.assert_close(rebuilt, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nn.functional.interpolate(folded.anchor[None], scale_factor=2)[0], adapter.anchor)
    samples = adapter.generate(4, seed=2, quantized=False)
    recovered = folded.invert(samples, alpha=1e-6, method="fista", max_iter=3000)
    assert recovered.shape == (4, 3, 5, 5)
    remade = folded.activation.forward(folded.linear_map.forward(recovered) + folded.linear_map.bias_map(recovered.device))
    torch.testing.assert_close(remade, torch.as_tensor(samples), rtol=0, atol=1e-3)
