"""Hard negatives the owner does not need to have: samples of perturbed copies of the generator.

A look-alike generator (same architecture, another seed or a fine-tune) makes samples that real
images alone do not teach the detector to reject. Copies of the generator with every weight
jittered by ``scale`` times that tensor's standard deviation make such samples from the owner's
model alone; training Deep SAD against them tells it that only this exact model's samples are
"mine".
"""

from __future__ import annotations

import numpy as np

from ..generators.adapter import GeneratorAdapter
from ..generators.challengers import perturbed_copy

__all__ = ["perturbed_samples"]


def perturbed_samples(adapter: GeneratorAdapter, n: int, scale: float = 0.2, copies: int = 4, seed: int = 0) -> np.ndarray:
    """``n`` samples (8-bit for images) spread over ``copies`` perturbed copies of the adapter's generator."""
    parts = []
    for k in range(copies):
        count = n // copies + (1 if k < n % copies else 0)
        if count == 0:
            continue
        clone = perturbed_copy(adapter.module, scale, seed=seed + k)
        other = GeneratorAdapter(
            clone, adapter.latent_shape, adapter.final_layer_name, dict(clone.named_modules())[adapter.final_layer_name],
            adapter.activation, adapter.penultimate_shape, adapter.output_shape, adapter.penultimate_bounds,
            device=adapter.device,
        )
        parts.append(other.generate(count, seed=seed + 7919 * (k + 1)))
    return np.concatenate(parts)
