"""Look-alike challengers onboarding builds from the owner's generator and real data alone.

An attribution detector is only as good as its worst look-alike, and the owner rarely has
someone else's copy of their architecture. Three kinds can be made without one:

- ``retrained``: the same architecture, re-initialised from another seed and trained briefly on
  the owner's real data (what a competitor with the published architecture would have);
- ``finetuned``: the owner's generator trained further on the real data (a leaked model that was
  fine-tuned: close to the owner's by construction, so a detector that accepts some of its
  samples is being honest about how much of the model is still the owner's);
- ``perturbed``: the owner's weights with Gaussian noise of a fraction of each tensor's spread.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..device import resolve_device, training_precision
from .training import train_gan

__all__ = ["CHALLENGER_KINDS", "build_challengers", "perturbed_copy"]

logger = logging.getLogger(__name__)

CHALLENGER_KINDS = ("retrained", "finetuned", "perturbed")


def perturbed_copy(module: nn.Module, scale: float, seed: int) -> nn.Module:
    """A deep copy of ``module`` with Gaussian noise of ``scale * std(w)`` added to every weight tensor."""
    if scale <= 0:
        raise ValueError(f"perturbation scale must be positive, got {scale}")
    clone = copy.deepcopy(module).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in clone.parameters():
            if param.numel() > 1 and param.is_floating_point():
                noise = torch.randn(param.shape, generator=generator).to(param.device, param.dtype)
                param.add_(noise * scale * param.detach().float().std().to(param.dtype))
    return clone


def _reinitialised(module: nn.Module, seed: int) -> nn.Module:
    clone = copy.deepcopy(module)
    torch.manual_seed(seed)
    for sub in clone.modules():
        if sub is not clone and hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
    return clone


def build_challengers(
    module: nn.Module,
    latent_shape: Sequence[int],
    real: np.ndarray,
    output_range: tuple[float, float],
    seed: int,
    train_steps: int = 300,
    perturb_scale: float = 0.1,
    kinds: Sequence[str] = CHALLENGER_KINDS,
    device: str = "cpu",
) -> dict[str, nn.Module]:
    """The challenger generators of ``kinds`` (eval mode, on the CPU). Training needs 8-bit
    images (``real`` uint8 (N, C, H, W) with a power-of-two size); for other outputs only
    ``perturbed`` is built. They train in the device's :func:`~flipad.device.training_precision`
    (1.4x faster per GAN step at 64x64 RGB on two cores with AMX). Deterministic for a seed on the
    CPU."""
    out: dict[str, nn.Module] = {}
    trainable = real.ndim == 4 and real.dtype == np.uint8 and real.shape[-1] >= 8 and real.shape[-1] & (real.shape[-1] - 1) == 0
    for kind in kinds:
        if kind not in CHALLENGER_KINDS:
            raise ValueError(f"unknown challenger kind {kind!r}; use any of {CHALLENGER_KINDS}")
        if kind == "perturbed":
            out[kind] = perturbed_copy(module, perturb_scale, seed).cpu().eval()
            continue
        if not trainable or train_steps <= 0:
            logger.info("challenger %s skipped: needs 8-bit square power-of-two images and train steps", kind)
            continue
        start = _reinitialised(module, seed) if kind == "retrained" else copy.deepcopy(module)
        start.latent_shape = tuple(latent_shape)  # what train_gan samples latents for
        with training_precision(resolve_device(device)):
            out[kind] = train_gan(start, real, steps=train_steps, seed=seed + (1 if kind == "finetuned" else 0),
                                  output_range=output_range, device=device, progress=False)
    return out
