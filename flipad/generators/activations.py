"""Elementwise invertible output activations: tanh, sigmoid and the identity.

Each knows its output range, how 8-bit pixels map into it, and its clipped
inverse ``s^-1`` (the inversion target).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..io.data import to_output_range

__all__ = ["OutputActivation", "ACTIVATIONS", "get_activation"]


@dataclass(frozen=True)
class OutputActivation:
    """An invertible elementwise output activation and the value range of its samples."""

    name: str
    low: float
    high: float

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """``s(y)``."""
        if self.name == "tanh":
            return torch.tanh(y)
        if self.name == "sigmoid":
            return torch.sigmoid(y)
        return y

    def inverse(self, x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
        """``s^-1(x)``, clipping ``x`` ``eps`` inside the open range first (tanh: atanh, sigmoid: logit)."""
        if self.name == "tanh":
            return torch.atanh(x.clamp(-1 + eps, 1 - eps))
        if self.name == "sigmoid":
            return torch.logit(x.clamp(eps, 1 - eps))
        return x

    def to_range(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Float samples in the output range: uint8 arrays are mapped from [0, 255]; floats pass through."""
        return to_output_range(samples, self.low, self.high)

    def saturated(self, samples: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
        """Mask of values at (or beyond) the ends of the range, where ``s^-1`` is clipped."""
        if self.name == "identity":
            return torch.zeros_like(samples, dtype=torch.bool)
        return (samples <= self.low + eps) | (samples >= self.high - eps)


ACTIVATIONS = {
    "tanh": OutputActivation("tanh", -1.0, 1.0),
    "sigmoid": OutputActivation("sigmoid", 0.0, 1.0),
    "identity": OutputActivation("identity", -1.0, 1.0),
}


def get_activation(name: str) -> OutputActivation:
    """The activation called ``name`` (tanh, sigmoid or identity)."""
    try:
        return ACTIVATIONS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown output activation {name!r}; use one of {sorted(ACTIVATIONS)}") from None
