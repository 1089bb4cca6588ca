"""Resolving the compute device once, from "auto", "cpu", "cuda" or "cuda:N", and the memory
layout a generator runs fastest in there."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["resolve_device", "search_layout"]

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device for ``device``: "auto" picks CUDA when available, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")
    return dev


def search_layout(module: nn.Module, latent_shape: Sequence[int]) -> nn.Module:
    """The generator as a latent search should run it: on the CPU, a copy with its 4-D weights in
    ``channels_last`` when it has any and the copy gives the same outputs (1.2x faster for
    transposed-convolution generators, 1.8x for upsample+conv and skip ones on two cores:
    docs/design.md); else ``module`` itself. The copy holds the same values, so
    its :func:`~flipad.generators.adapter.weights_fingerprint` is the module's. CUDA keeps the
    module as it is (not measured there)."""
    parameter = next(module.parameters(), None)
    if parameter is None or parameter.device.type != "cpu" or not any(p.dim() == 4 for p in module.parameters()):
        return module
    probe = torch.randn(4, *latent_shape, generator=torch.Generator().manual_seed(0))
    try:
        fast = copy.deepcopy(module).to(memory_format=torch.channels_last)
        with torch.no_grad():
            expected, got = module(probe), fast(probe)
        same = got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    except Exception as exc:  # a module that cannot be copied or run channels-last keeps its layout
        logger.debug("generator kept in its own layout: %s", exc)
        return module
    return fast if same else module
