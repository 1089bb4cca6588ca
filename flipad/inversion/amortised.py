"""Amortised latent inversion: an encoder's guess, refined by Levenberg-Marquardt in latent space.

A generator supplies unlimited ``(z, G(z))`` pairs, so an encoder ``E(x) ~ z`` can be trained on
fresh, 8-bit quantised samples with nothing from the owner (:func:`train_encoder`). Its guess lands
near the item's latent; :func:`levenberg_marquardt` then solves the small normal equations
``(J^T J + lambda diag(J^T J)) dz = -J^T r`` per item (``J`` has as many columns as the latent has
dimensions, taken by forward-mode differentiation), which converges in a few steps once the start
lies in the right basin. An item stops once its MSE is below twice the quantisation floor.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["LatentEncoder", "quantisation_floor", "train_encoder", "levenberg_marquardt"]

JACOBIAN_BUDGET = 1 << 24  # floats of Jacobian held at once: bounds the memory of one LM chunk
# PyTorch's forward-mode AD levels are process-global, not per thread: two threads taking a
# Jacobian at once (the attribution flow scores batches concurrently) corrupt each other's level
FORWARD_AD = threading.Lock()


def quantisation_floor(output_range: tuple[float, float]) -> float:
    """The pixel MSE of an 8-bit copy of a generator output: ``(step)^2 / 12`` for the range's 255 steps."""
    low, high = output_range
    return ((high - low) / 255) ** 2 / 12


class LatentEncoder(nn.Module):
    """A conv encoder from a ``(C, H, W)`` sample to a latent of ``latent_shape``.

    Stride-2 convolutions halve the map until it is at most 4x4 (adaptive pooling takes it to
    4x4), then two linear layers give the latent.
    """

    def __init__(self, output_shape: Sequence[int], latent_shape: Sequence[int], width: int = 32):
        super().__init__()
        channels, height, _ = output_shape
        self.latent_shape = tuple(latent_shape)
        layers: list[nn.Module] = []
        size, c_in, c_out = height, channels, width
        while size > 4:
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1)]
            layers += [nn.BatchNorm2d(c_out)] if layers[:-1] else []  # no normalisation on the input layer
            layers += [nn.LeakyReLU(0.2)]
            size, c_in, c_out = size // 2, c_out, min(c_out * 2, 256)
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(c_in * 16, 512), nn.LeakyReLU(0.2), nn.Linear(512, math.prod(latent_shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).view(-1, *self.latent_shape)


def train_encoder(
    module: nn.Module,
    latent_shape: Sequence[int],
    output_shape: Sequence[int],
    output_range: tuple[float, float],
    steps: int,
    batch_size: int = 256,
    image_weight: float = 10.0,
    seed: int = 0,
) -> LatentEncoder:
    """An encoder for ``module`` trained on ``steps`` batches of fresh 8-bit ``(z, G(z))`` pairs.

    The loss is ``|E(x) - z|^2 + image_weight * |G(E(x)) - x|^2`` (the latent term finds the basin,
    the image term what the search is judged on). Deterministic for ``seed`` on one device.
    """
    device = next(module.parameters()).device
    low, high = output_range
    scale = (high - low) / 255
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        encoder = LatentEncoder(output_shape, latent_shape).to(device)
    opt = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        z = torch.randn(batch_size, *latent_shape, generator=gen).to(device)
        with torch.no_grad():
            x = torch.round((module(z) - low) / scale) * scale + low  # what an 8-bit copy holds
        guess = encoder(x)
        # only the encoder's weights are updated; the generator's get no gradients
        reconstruction = ((module(guess) - x) ** 2).mean()
        loss = ((guess - z) ** 2).mean() + image_weight * reconstruction
        grads = torch.autograd.grad(loss, list(encoder.parameters()))
        for p, g in zip(encoder.parameters(), grads):
            p.grad = g
        opt.step()
        schedule.step()
    return encoder.eval()


def levenberg_marquardt(
    module: nn.Module, targets: torch.Tensor, z: torch.Tensor, iterations: int, floor: float
) -> torch.Tensor:
    """Per-item LM on ``mean((module(z) - target)^2)`` from ``z`` (changed in place); returns the
    final MSE per item. An item stops once its MSE is below ``2 * floor``."""
    latent_shape = z.shape[1:]
    dim, out_dim = math.prod(latent_shape), targets[0].numel()
    chunk = max(1, JACOBIAN_BUDGET // (dim * out_dim))
    losses = [_lm_chunk(module, targets[i : i + chunk], z[i : i + chunk], iterations, floor, latent_shape)
              for i in range(0, len(targets), chunk)]
    return torch.cat(losses) if losses else torch.empty(0, device=targets.device)


def _lm_chunk(module: nn.Module, targets: torch.Tensor, z: torch.Tensor, iterations: int, floor: float,
              latent_shape: torch.Size) -> torch.Tensor:
    flat = targets.flatten(1)
    zf = z.view(len(z), -1)

    def one(zi: torch.Tensor) -> torch.Tensor:
        return module(zi.view(1, *latent_shape))[0].flatten()

    with torch.no_grad():
        loss = ((module(z).flatten(1) - flat) ** 2).mean(1)
    damping = torch.full_like(loss, 1e-3)
    active = loss > 2 * floor
    for _ in range(iterations):
        idx = active.nonzero().squeeze(1)
        if not len(idx):
            break
        za = zf[idx]
        with torch.no_grad(), FORWARD_AD:
            jac = torch.func.vmap(torch.func.jacfwd(one))(za)
        with torch.no_grad():
            residual = module(za.view(-1, *latent_shape)).flatten(1) - flat[idx]
            normal = jac.transpose(1, 2) @ jac
            gradient = (jac.transpose(1, 2) @ residual[..., None])[..., 0]
            diagonal = torch.diagonal(normal, dim1=1, dim2=2)
            normal = normal + torch.diag_embed(damping[idx, None] * (diagonal + 1e-9))
            step = torch.linalg.solve(normal, -gradient)
            new = ((module((za + step).view(-1, *latent_shape)).flatten(1) - flat[idx]) ** 2).mean(1)
        better = new < loss[idx]
        zf[idx[better]] = za[better] + step[better]
        loss[idx] = torch.minimum(new, loss[idx])
        damping[idx] = torch.where(better, damping[idx] / 5, damping[idx] * 5)
        active[idx] = loss[idx] > 2 * floor
    return loss
