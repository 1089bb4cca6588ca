"""Drawing samples from any generator module: its latent shape, its output range and 8-bit samples."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..io.data import quantize

__all__ = ["generate_samples", "probe_output_range", "resolve_latent_shape", "sample_latents"]

SAMPLE_BATCH = 256  # latents per forward pass when drawing samples


def resolve_latent_shape(module: nn.Module, latent_shape: Sequence[int] | None) -> tuple[int, ...]:
    """``latent_shape``, else the module's ``latent_shape`` attribute; ValueError when neither is there."""
    shape = latent_shape if latent_shape is not None else getattr(module, "latent_shape", None)
    if shape is None:
        raise ValueError("latent_shape is required: the module has no latent_shape attribute "
                         "(pass --latent-shape D[,D...] or latent_shape=(...))")
    return tuple(int(s) for s in shape)


def sample_latents(n: int, latent_shape: Sequence[int], seed: int) -> torch.Tensor:
    """``n`` standard-normal latents, reproducible from ``seed`` (the draws every sampler uses)."""
    return torch.randn(n, *latent_shape, generator=torch.Generator().manual_seed(seed))


def probe_output_range(module: nn.Module, latent_shape: Sequence[int], device: torch.device | str = "cpu") -> tuple[float, float]:
    """(-1, 1) for generators whose samples reach below zero (tanh-like), else (0, 1)."""
    with torch.no_grad():
        out = module(sample_latents(16, latent_shape, 0).to(device))
    return (-1.0, 1.0) if float(out.min()) < -1e-3 else (0.0, 1.0)


def generate_samples(
    module: nn.Module,
    latent_shape: Sequence[int],
    n: int,
    seed: int,
    output_range: tuple[float, float],
    device: torch.device | str = "cpu",
    quantized: bool = True,
) -> np.ndarray:
    """``n`` samples of any generator from the latents :func:`sample_latents` draws for ``seed``;
    images (``(N, C, H, W)`` outputs) quantised to 8 bits within ``output_range`` unless
    ``quantized`` is False, other outputs as float32."""
    latents = sample_latents(n, latent_shape, seed)
    chunks = []
    with torch.no_grad():
        for start in range(0, n, SAMPLE_BATCH):
            chunks.append(module(latents[start : start + SAMPLE_BATCH].to(device)).cpu())
    samples = torch.cat(chunks) if chunks else torch.empty(0)
    if quantized and samples.dim() == 4:
        return quantize(samples, *output_range)
    return samples.float().numpy()
