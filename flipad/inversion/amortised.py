"""Amortised latent inversion: an encoder's guess, refined by Levenberg-Marquardt in latent space.

A generator supplies unlimited ``(z, G(z))`` pairs, so an encoder ``E(x) ~ z`` can be trained on
fresh, 8-bit quantised samples with nothing from the owner (:func:`train_encoder`). Its guess lands
near the item's latent; :func:`levenberg_marquardt` then solves the small normal equations
``(J^T J + lambda diag(J^T J)) dz = -J^T r`` per item (``J`` has as many columns as the latent has
dimensions, taken by forward-mode differentiation), which converges in a few steps once the start
lies in the right basin. An item stops once its MSE is below twice the quantisation floor, or,
where only the verdict is wanted, once :class:`Exits` say it is settled.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Exits", "LatentEncoder", "levenberg_marquardt", "lm_trajectories", "quantisation_floor", "train_encoder"]

JACOBIAN_BUDGET = 1 << 24  # floats of Jacobian held at once: bounds the memory of one LM chunk
# PyTorch's forward-mode AD levels are process-global, not per thread: two threads taking a
# Jacobian at once (the attribution flow scores batches concurrently) corrupt each other's level
FORWARD_AD = threading.Lock()
MAX_REJECTED = 8  # rejected steps in a row (damping x5 each) before an item gives up
SCREEN_MARGIN = 1.5  # how far above the worst attributed own calibration item the screen sits


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


@dataclass(frozen=True)
class Exits:
    """Where an item's verdict is settled before its search ends (attribution, not calibration).

    Checked before each Jacobian: an item stops once its loss is at or below ``accept`` (it is
    attributed at every threshold, and further steps only lower its loss), or when its loss after
    ``k`` Jacobians is above ``screen[k]`` (set at fit above every attributed own calibration item,
    :meth:`calibrated`). The default stops nothing early.
    """

    accept: float = 0.0
    screen: tuple[float, ...] = ()

    @classmethod
    def calibrated(cls, trajectories: torch.Tensor, threshold: float, accept: float, margin: float = SCREEN_MARGIN) -> Exits:
        """The exits of a fitted detector: ``trajectories`` (n, K+1) of own calibration items
        (every condition); ``screen[k]`` is ``margin`` times the largest loss after ``k`` Jacobians
        of those whose final loss is within ``threshold`` (the loosest), so none of them is cut."""
        kept = trajectories[trajectories[:, -1] <= threshold]
        if not len(kept):
            return cls(accept=accept)
        return cls(accept=accept, screen=tuple(float(v) * margin for v in kept[:, :-1].max(0).values))

    def settle(self, trajectories: torch.Tensor) -> torch.Tensor:
        """The loss each item stops at under these exits, from its exhaustive ``trajectories``
        (what :func:`lm_trajectories` with these exits returns in its last column)."""
        n, columns = trajectories.shape
        stop = trajectories <= self.accept
        screen = torch.tensor(self.screen[: columns - 1], dtype=trajectories.dtype)
        stop[:, : len(screen)] |= trajectories[:, : len(screen)] > screen
        stop[:, -1] = True
        first = stop.to(torch.int8).argmax(1)
        return trajectories[torch.arange(n), first]


def levenberg_marquardt(module: nn.Module, targets: torch.Tensor, z: torch.Tensor, iterations: int, floor: float,
                        exits: Exits = Exits()) -> torch.Tensor:
    """The final MSE per item of :func:`lm_trajectories` (``z`` changed in place)."""
    return lm_trajectories(module, targets, z, iterations, floor, exits)[:, -1]


def lm_trajectories(module: nn.Module, targets: torch.Tensor, z: torch.Tensor, iterations: int, floor: float,
                    exits: Exits = Exits()) -> torch.Tensor:
    """Per-item LM on ``mean((module(z) - target)^2)`` from ``z`` (changed in place) with at most
    ``iterations`` Jacobians; ``(n, iterations + 1)``: column ``k`` is an item's MSE after the steps
    taken with its ``k``-th Jacobian (column 0 the start, the last the result; an item that stopped
    keeps its loss). A rejected step retries with more damping on the same Jacobian. An item stops
    below ``2 * floor``, at an exit, after ``MAX_REJECTED`` rejected steps in a row, or when its
    Jacobians are spent."""
    latent_shape = z.shape[1:]
    dim, out_dim = math.prod(latent_shape), targets[0].numel()
    chunk = max(1, JACOBIAN_BUDGET // (dim * out_dim))
    parts = [_lm_chunk(module, targets[i : i + chunk], z[i : i + chunk], iterations, floor, exits)
             for i in range(0, len(targets), chunk)]
    return torch.cat(parts) if parts else torch.empty(0, iterations + 1, device=targets.device)


def _lm_chunk(module: nn.Module, targets: torch.Tensor, z: torch.Tensor, iterations: int, floor: float,
              exits: Exits) -> torch.Tensor:
    latent_shape = z.shape[1:]
    flat = targets.flatten(1)
    zf = z.view(len(z), -1)
    n, dim = zf.shape
    device = targets.device

    def one(zi: torch.Tensor) -> torch.Tensor:
        return module(zi.view(1, *latent_shape))[0].flatten()

    with torch.no_grad():
        residual = module(z).flatten(1) - flat
    loss = (residual**2).mean(1)
    trajectory = loss[:, None].repeat(1, iterations + 1)
    screen = torch.tensor([*exits.screen[:iterations], *[math.inf] * (iterations + 1 - len(exits.screen[:iterations]))],
                          device=device, dtype=loss.dtype)
    damping = torch.full_like(loss, 1e-3)
    normal = loss.new_empty(n, dim, dim)
    gradient = loss.new_empty(n, dim)
    jacobians = torch.zeros(n, dtype=torch.long, device=device)
    rejected = torch.zeros_like(jacobians)
    stale = torch.ones(n, dtype=torch.bool, device=device)  # the next step needs a new Jacobian

    def going(idx: torch.Tensor) -> torch.Tensor:
        settled = stale[idx] & ((loss[idx] <= exits.accept) | (loss[idx] > screen[jacobians[idx]])
                                | (jacobians[idx] >= iterations))
        return (loss[idx] > 2 * floor) & (rejected[idx] < MAX_REJECTED) & ~settled

    columns = torch.arange(iterations + 1, device=device)
    active = torch.zeros(n, dtype=torch.bool, device=device)
    every = torch.arange(n, device=device)
    active[every] = going(every)
    while (idx := active.nonzero().squeeze(1)).numel():
        need = idx[stale[idx]]
        if len(need):
            with torch.no_grad(), FORWARD_AD:
                jac = torch.func.vmap(torch.func.jacfwd(one))(zf[need])
            with torch.no_grad():
                normal[need] = jac.transpose(1, 2) @ jac
                gradient[need] = (jac.transpose(1, 2) @ residual[need, :, None])[..., 0]
            del jac
            stale[need], jacobians[need] = False, jacobians[need] + 1
        with torch.no_grad():
            a = normal[idx]
            diagonal = torch.diagonal(a, dim1=1, dim2=2)
            step = torch.linalg.solve(a + torch.diag_embed(damping[idx, None] * (diagonal + 1e-9)), -gradient[idx])
            new_residual = module((zf[idx] + step).view(-1, *latent_shape)).flatten(1) - flat[idx]
            new = (new_residual**2).mean(1)
        better = new < loss[idx]
        moved = idx[better]
        zf[moved] += step[better]
        residual[moved], loss[moved] = new_residual[better], new[better]
        stale[moved], rejected[moved] = True, 0
        rejected[idx[~better]] += 1
        damping[idx] = torch.where(better, damping[idx] / 5, damping[idx] * 5)
        trajectory[idx] = torch.where(columns >= jacobians[idx, None], loss[idx, None], trajectory[idx])
        active[idx] = going(idx)
    return trajectory
