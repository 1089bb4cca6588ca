"""Amortised latent inversion: an encoder's guess, refined by Levenberg-Marquardt in latent space.

A generator supplies unlimited ``(z, G(z))`` pairs, so an encoder ``E(x) ~ z`` can be trained on
fresh, 8-bit quantised samples with nothing from the owner (:func:`train_encoder`). Its guess lands
near the item's latent; :func:`levenberg_marquardt` then solves the small normal equations
``(J^T J + lambda diag(J^T J)) dz = -J^T r`` per item (``J`` has as many columns as the latent has
dimensions, taken by forward differences: one batched forward pass of ``dim + 1`` latents per
item), which converges in a few steps once the start lies in the right basin. A Jacobian costs as
much as ``dim`` forward passes and a step one, so each Jacobian serves up to ``chord_steps``
steps, each with the gradient ``J^T r`` of the current residual (a chord, or Shamanskii, method).
An item stops once its MSE is below twice the quantisation floor, or, where only the verdict is
wanted, once :class:`Exits` say it is settled. The steps lower the MSE; what an item scores is
the lowest loss in a ``metric`` (:mod:`flipad.inversion.metrics`, the MSE by default) among the
latents its steps reached.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..device import working_memory
from ..progress import report
from .metrics import ResidualMetric

__all__ = ["Differentiate", "Exits", "LatentEncoder", "Metric", "anderson_step", "encoder_lm_trajectories",
           "encoder_steps_within", "fixed_point_trajectories", "jacobian", "levenberg_marquardt", "lm_trajectories", "mse",
           "quantisation_floor", "sketch_basis", "train_encoder"]

# float32 copies of a chunk's Jacobians held while they are taken, kept and multiplied (about 7
# measured: a 13.5 GB peak with 1.8 GB of Jacobians per chunk at 128x128 RGB, bench generator_sizes)
JACOBIAN_COPIES = 8
ENCODER_BATCH = 256  # fresh generator pairs per batch of the encoder's training
# batches below which a budget does not cut the encoder's training: 75 batches of 256 still gave
# 64x64 RGB own items starts without a tail (docs/design.md); fewer were not measured
MIN_ENCODER_STEPS = 100
CHORD_STEPS = 8  # steps an LM Jacobian serves before a new one is taken
FD_STEP = 1e-3  # the latent step of the forward differences (latents are ~N(0, 1))
FD_ROWS = 512  # latents per forward pass of the forward differences: bounds their activations (and
# keeps each allocation small enough for a thread's malloc arena: concurrent batches ran 1.2x faster)
MIN_DAMPING = 1e-6  # successes lower the damping no further, so a failure soon raises it to where steps help
STALL = 0.02  # an item whose loss fell by less than this share over a Jacobian's steps has converged
MAX_REJECTED = 8  # rejected steps in a row (damping x5 each) before an item gives up
SCREEN_MARGIN = 1.5  # how far above the worst attributed own calibration item the screen sits
SKETCH_ENERGY = 0.99  # the share of the generator's mean J^T J trace the sketch's directions hold
SKETCH_LATENTS = 64  # prior latents the sketch's directions are estimated at
SKETCH_STEPS = 4  # steps the sketched Jacobian serves


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
    batch_size: int = ENCODER_BATCH,
    image_weight: float = 10.0,
    seed: int = 0,
) -> LatentEncoder:
    """An encoder for ``module`` trained on ``steps`` batches of fresh 8-bit ``(z, G(z))`` pairs.

    The loss is ``|E(x) - z|^2 + image_weight * |G(E(x)) - x|^2`` (the latent term finds the basin,
    the image term what the search is judged on). It trains in float32: in bfloat16 autocast
    (:func:`~flipad.device.training_precision`) it was twice as fast at 64x64 RGB but made a
    32x32 RGB look-alike's rejection vary from run to run (docs/design.md). Deterministic for
    ``seed`` on one device.
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
        grads = _encoder_gradients(module, encoder, z, low, scale, image_weight)
        for p, g in zip(encoder.parameters(), grads):
            p.grad = g
        opt.step()
        schedule.step()
        report(1)
    return encoder.eval()


def _encoder_gradients(module: nn.Module, encoder: LatentEncoder, z: torch.Tensor, low: float, scale: float,
                       image_weight: float) -> tuple[torch.Tensor, ...]:
    """One training step's gradients of the encoder's weights on the latents ``z``."""
    with torch.no_grad():
        x = torch.round((module(z) - low) / scale) * scale + low  # what an 8-bit copy holds
    guess = encoder(x)
    # only the encoder's weights are updated; the generator's get no gradients
    reconstruction = ((module(guess) - x) ** 2).mean()
    loss = ((guess - z) ** 2).mean() + image_weight * reconstruction
    return torch.autograd.grad(loss, list(encoder.parameters()))


def encoder_steps_within(module: nn.Module, latent_shape: Sequence[int], output_shape: Sequence[int],
                         output_range: tuple[float, float], max_steps: int, tflop: float,
                         batch_size: int = ENCODER_BATCH) -> int:
    """The batches :func:`train_encoder` may take within ``tflop`` TFLOP of training (at most
    ``max_steps``, at least ``MIN_ENCODER_STEPS``; ``tflop=0``: ``max_steps``). A step's FLOPs are
    counted once (``torch.utils.flop_counter``) on two latents: the generator's forward passes and
    the encoder's forward and backward pass, which grow with the image, not with the latent."""
    if not tflop:
        return max_steps
    low, high = output_range
    device = next(module.parameters()).device
    encoder = LatentEncoder(output_shape, latent_shape).to(device)
    z = torch.randn(2, *latent_shape, generator=torch.Generator().manual_seed(0)).to(device)
    with FlopCounterMode(display=False) as counter:
        _encoder_gradients(module, encoder, z, low, (high - low) / 255, 1.0)
    per_item = counter.get_total_flops() / len(z)
    return max(min(max_steps, MIN_ENCODER_STEPS), min(max_steps, int(tflop * 1e12 / (batch_size * max(per_item, 1)))))


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
        of those whose final loss is within ``threshold`` (the loosest), so none of them is cut. A
        NaN marks a column an item never was at; a column none of them was at screens nothing."""
        kept = trajectories[trajectories[:, -1] <= threshold]
        if not len(kept):
            return cls(accept=accept)
        largest = kept[:, :-1].nan_to_num(nan=-math.inf).max(0).values
        return cls(accept=accept, screen=tuple(float(v) * margin if v > -math.inf else math.inf for v in largest))

    @classmethod
    def checked(cls, parts: Sequence[torch.Tensor], threshold: float, accept: float) -> tuple[Exits, float]:
        """:meth:`calibrated` on the trajectories of every condition in ``parts``, with
        :meth:`held_out_cuts`' two-fold check of its screens."""
        return cls.calibrated(torch.cat(list(parts)), threshold, accept), cls.held_out_cuts(parts, threshold, accept)

    @classmethod
    def held_out_cuts(cls, parts: Sequence[torch.Tensor], threshold: float, accept: float,
                      margin: float = SCREEN_MARGIN) -> float:
        """A two-fold check of :meth:`calibrated`'s screens: the share of own calibration items an
        exhaustive search attributes (final loss within ``threshold``) that screens set on the other
        half of the items would reject. ``parts``: the trajectories of each condition, row ``i`` of
        each the same held-out item (so an item's re-saves stay in its fold). Screens set on half
        the items sit lower than those set on all of them, so this overstates what they cut."""
        cut = kept = 0
        for fold in (0, 1):
            halves = [[part[(torch.arange(len(part)) % 2) == side] for part in parts] for side in (fold, 1 - fold)]
            exits = cls.calibrated(torch.cat(halves[0]), threshold, accept, margin)
            held = torch.cat(halves[1])
            held = held[held[:, -1] <= threshold]
            cut += int((exits.settle(held) > threshold).sum())
            kept += len(held)
        return cut / kept if kept else math.nan

    def settle(self, trajectories: torch.Tensor) -> torch.Tensor:
        """The loss each item stops at under these exits, from its exhaustive ``trajectories``
        (what :func:`lm_trajectories` with these exits returns in its last column); a NaN column
        (never visited) stops nothing."""
        n, columns = trajectories.shape
        stop = trajectories <= self.accept
        screen = torch.tensor(self.screen[: columns - 1], dtype=trajectories.dtype)
        stop[:, : len(screen)] |= trajectories[:, : len(screen)] > screen
        stop[:, -1] = True
        first = stop.to(torch.int8).argmax(1)
        return trajectories[torch.arange(n), first]


Metric = Callable[[torch.Tensor], torch.Tensor]  # residuals (n, out_dim) -> loss per item
# latents (n, *latent_shape) -> Jacobians (n, out_dim, dim); with a second argument, a basis (dim, k)
# of orthonormal columns, the Jacobians' products with it (n, out_dim, k)
Differentiate = Callable[..., torch.Tensor]


def mse(residual: torch.Tensor) -> torch.Tensor:
    """The mean squared residual per item (the default metric)."""
    return (residual**2).mean(1)


def levenberg_marquardt(module: nn.Module, targets: torch.Tensor, z: torch.Tensor, iterations: int, floor: float,
                        exits: Exits = Exits(), chord_steps: int = CHORD_STEPS, metric: Metric = mse,
                        differentiate: Differentiate | None = None) -> torch.Tensor:
    """The final loss per item of :func:`lm_trajectories` (``z`` changed in place)."""
    return lm_trajectories(module, targets, z, iterations, floor, exits, chord_steps, metric, differentiate)[:, -1]


def lm_trajectories(module: nn.Module, targets: torch.Tensor, z: torch.Tensor, iterations: int, floor: float,
                    exits: Exits = Exits(), chord_steps: int = CHORD_STEPS, metric: Metric = mse,
                    differentiate: Differentiate | None = None, basis: torch.Tensor | None = None,
                    reached: torch.Tensor | None = None, whitened: ResidualMetric | None = None) -> torch.Tensor:
    """Per-item LM on ``mean((module(z) - target)^2)`` from ``z`` (changed in place) with at most
    ``iterations`` Jacobians; ``(n, iterations + 1)``: column ``k`` is an item's loss in ``metric``
    (of the flattened residuals) after the steps taken with its ``k``-th Jacobian, the lowest among
    the latents reached so far (column 0 the start, the last the result; an item that stopped
    keeps its loss). The exits compare that loss; ``z`` ends at the lowest MSE. A Jacobian serves
    ``chord_steps`` step attempts (a failed one raises the damping); then the item takes a new
    Jacobian if it has moved, else keeps retrying on this one. An item stops once its MSE is below
    ``2 * floor``, at an exit, when a Jacobian's steps lowered its MSE by less than ``STALL``, after
    ``MAX_REJECTED`` failed steps in a row where its Jacobian was taken, or when its Jacobians are
    spent. ``differentiate(z)`` takes the Jacobians (:func:`flipad.inversion.tangents.search_jacobian`);
    forward differences of ``module`` (:func:`jacobian`) by default. With a ``basis`` (``(dim, k)``,
    :func:`sketch_basis`) the first Jacobian is sketched: its product with the basis (``k`` tangents
    instead of ``dim``) serves ``SKETCH_STEPS`` steps within the basis's span, which settle most
    items' verdicts at a fraction of a full Jacobian's cost; the later Jacobians are full.
    ``reached``: per item, the lowest loss in ``metric`` an earlier search reached (column 0 takes it
    where it is below the start's). With ``whitened``, the least squares are those of
    ``whitened.whiten(module(z) - target)`` (:meth:`ResidualMetric.whiten`): the steps minimise that
    metric itself, which is then the loss the trajectories and exits hold (``metric`` is not used),
    and ``floor`` is in its units."""
    if chord_steps < 1:
        raise ValueError(f"chord_steps must be at least 1, got {chord_steps}")
    differentiate = differentiate or partial(jacobian, module)
    if whitened is not None:
        module, differentiate, targets, metric = _whitened_problem(module, differentiate, targets, whitened)
    latent_shape = z.shape[1:]
    dim, out_dim = math.prod(latent_shape), targets[0].numel()
    chunk = max(1, working_memory(targets.device) // (JACOBIAN_COPIES * 4 * dim * out_dim))
    parts = [_lm_chunk(module, targets[i : i + chunk], z[i : i + chunk], iterations, floor, exits, chord_steps, metric,
                       differentiate, basis, None if reached is None else reached[i : i + chunk])
             for i in range(0, len(targets), chunk)]
    return torch.cat(parts) if parts else torch.empty(0, iterations + 1, device=targets.device)


def anderson_step(z: torch.Tensor, f: torch.Tensor, history: tuple[torch.Tensor, torch.Tensor],
                  has_history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed-point iteration ``z + f(z)``, Anderson-accelerated with memory 1, as ``(base,
    towards)`` with the new point ``base + towards`` (``base + a * towards`` for a step size ``a``).
    An item with a previous point (``history``: its ``z`` and ``f``, where ``has_history``) takes the
    secant through the two: ``z - g dz + (f - g df)``, ``g = <df, f> / <df, df>`` (``dz``, ``df``:
    the changes since that point), at no extra pass; the others (and ``df = 0``) the plain step."""
    if not has_history.any():
        return z, f
    dz, df = (z - history[0]).flatten(1), (f - history[1]).flatten(1)
    norm = (df * df).sum(1)
    fitted = has_history & (norm > 0)
    gamma = torch.where(fitted, (df * f.flatten(1)).sum(1) / norm.clamp_min(1e-30), 0.0)
    return z - (gamma[:, None] * dz).view_as(z), f - (gamma[:, None] * df).view_as(f)


@torch.no_grad()
def fixed_point_trajectories(module: nn.Module, encoder: nn.Module, targets: torch.Tensor, steps: int, floor: float,
                             exits: Exits = Exits(), metric: Metric = mse
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The encoder's start refined by ``steps`` fixed-point steps ``z <- z + E(x) - E(G(z))``.

    An item ``module`` made is a fixed point at its own latent whatever the encoder, and the steps
    converge to it where ``E`` inverts ``G`` roughly; each costs one encoder and one generator pass,
    whatever the latent size. Steps after an item's first are Anderson-accelerated
    (:func:`anderson_step`); an item leaves the steps at the first that does not lower its MSE,
    at the quantisation floor (``2 * floor``), or where ``exits`` settle it (``exits.screen[k]``
    after ``k`` steps). Returns the latents (the lowest MSE reached), ``(n, steps + 1)``
    trajectories (column ``k``: the lowest loss in ``metric`` after ``k`` steps; column 0 the
    start), and which items ``exits`` or the floor settled (the others go on searching)."""
    n = len(targets)
    flat = targets.flatten(1)
    encoded = encoder(targets)
    z = encoded.clone()
    outputs = module(z)
    residual = outputs.flatten(1) - flat
    loss, score = (residual**2).mean(1), metric(residual)
    trajectory = score[:, None].repeat(1, steps + 1)
    screen = torch.tensor([*exits.screen, *[math.inf] * (steps + 1)][: steps + 1], device=z.device, dtype=score.dtype)
    history = torch.zeros(2, *z.shape, dtype=z.dtype, device=z.device)  # per item: its last point's z and f
    has_history = torch.zeros(n, dtype=torch.bool, device=z.device)
    stepping = torch.ones(n, dtype=torch.bool, device=z.device)
    settled = torch.zeros(n, dtype=torch.bool, device=z.device)
    for k in range(steps):
        settled |= (score <= exits.accept) | (score > screen[k]) | (loss <= 2 * floor)
        stepping &= ~settled
        if not (idx := stepping.nonzero().squeeze(1)).numel():
            break
        f = encoded[idx] - encoder(outputs[idx])
        base, towards = anderson_step(z[idx], f, (history[0, idx], history[1, idx]), has_history[idx])
        history[0, idx], history[1, idx], has_history[idx] = z[idx], f, True
        moved = base + towards
        new_outputs = module(moved)
        new_residual = new_outputs.flatten(1) - flat[idx]
        new = (new_residual**2).mean(1)
        better = new < loss[idx]
        went = idx[better]
        z[went], outputs[went] = moved[better], new_outputs[better]
        residual[went], loss[went] = new_residual[better], new[better]
        score[went] = torch.minimum(score[went], metric(new_residual[better]))
        stepping[idx[~better]] = False
        trajectory[idx, k + 1 :] = score[idx, None]
    settled |= (score <= exits.accept) | (score > screen[steps]) | (loss <= 2 * floor)
    return z, trajectory, settled


def encoder_lm_trajectories(module: nn.Module, encoder: nn.Module, targets: torch.Tensor, fixed_point_steps: int,
                            iterations: int, floor: float, exits: Exits = Exits(), metric: Metric = mse,
                            differentiate: Differentiate | None = None,
                            basis: torch.Tensor | None = None, whitened: ResidualMetric | None = None) -> torch.Tensor:
    """The ``encoder-lm`` search of ``targets``: the encoder's start, ``fixed_point_steps``
    (:func:`fixed_point_trajectories`), then :func:`lm_trajectories` with ``iterations`` Jacobians
    for the items not yet settled. ``(n, fixed_point_steps + iterations + 1)``: column ``k <=
    fixed_point_steps`` the loss after ``k`` fixed-point steps, column ``fixed_point_steps + j``
    after ``j`` Jacobians; ``exits.screen`` counts columns the same way. With ``whitened`` (the
    ``metric`` as a :class:`ResidualMetric`), the Jacobians' steps minimise the metric itself, down
    to its floor, instead of the MSE."""
    z, steps, settled = fixed_point_trajectories(module, encoder, targets, fixed_point_steps, floor, exits, metric)
    trajectory = torch.cat([steps, steps[:, -1:].repeat(1, iterations)], 1)
    if (idx := (~settled).nonzero().squeeze(1)).numel():
        later = Exits(exits.accept, tuple(exits.screen[fixed_point_steps:]))
        trajectory[idx, fixed_point_steps:] = lm_trajectories(
            module, targets[idx], z[idx], iterations, floor if whitened is None else whitened.floor, later,
            metric=metric, differentiate=differentiate, basis=basis, reached=steps[idx, -1], whitened=whitened)
    return trajectory


@torch.no_grad()
def jacobian(module: nn.Module, z: torch.Tensor, step: float = FD_STEP, basis: torch.Tensor | None = None) -> torch.Tensor:
    """``(n, out_dim, dim)``: the Jacobian of the flattened ``module`` output at each latent of
    ``z`` (``(n, *latent_shape)``), by forward differences of ``step`` in each latent coordinate;
    with a ``basis`` ``(dim, k)`` of orthonormal columns, its product with the basis
    ``(n, out_dim, k)`` by differences along those columns.

    As costly as forward-mode differentiation's ``dim`` tangents in arithmetic, without its
    dual-number overhead (1.7x faster on CPU for a DCGAN) or its process-global state; within about
    1% of the exact Jacobian, which LM tolerates (it only accepts steps that lower the loss).
    """
    latent_shape, n = z.shape[1:], len(z)
    flat = z.reshape(n, -1)
    directions = torch.eye(flat.shape[1], device=z.device, dtype=z.dtype) if basis is None else basis.T.to(z.dtype)
    dim = len(directions)
    probes = torch.cat([flat[:, None], flat[:, None] + step * directions], 1)
    probes = probes.view(-1, *latent_shape)
    outputs = torch.cat([module(probes[i : i + FD_ROWS]).flatten(1) for i in range(0, len(probes), FD_ROWS)])
    outputs = outputs.view(n, dim + 1, -1)
    return ((outputs[:, 1:] - outputs[:, :1]) / step).transpose(1, 2)


@torch.no_grad()
def sketch_basis(differentiate: Differentiate, latent_shape: Sequence[int], max_dims: int, seed: int = 0,
                 device: torch.device | str = "cpu", latents: int = SKETCH_LATENTS) -> torch.Tensor | None:
    """``(dim, k)``: the latent directions that move the generator's output most, the top
    eigenvectors of ``E[J^T J]`` over ``latents`` prior latents (its own items' latents), ``k`` the
    fewest holding ``SKETCH_ENERGY`` of the trace. None where that takes more than ``max_dims``:
    a step within them would leave too much of the output's motion out to settle items. The
    sketched first step of :func:`lm_trajectories` works in their span: its Jacobian costs ``k``
    tangents, not ``dim``."""
    z = torch.randn(latents, *latent_shape, generator=torch.Generator().manual_seed(seed)).to(device)
    dim = math.prod(latent_shape)
    moment = torch.zeros(dim, dim, device=device, dtype=torch.float64)
    for i in range(0, latents, 8):
        jac = differentiate(z[i : i + 8]).double()
        moment += (jac.transpose(1, 2) @ jac).sum(0)
    values, vectors = torch.linalg.eigh(moment / latents)
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
    share = values.cumsum(0) / values.sum().clamp(min=1e-30)
    k = int((share < SKETCH_ENERGY).sum()) + 1
    return vectors[:, :k].float().contiguous() if k <= max_dims and k < dim else None


@torch.no_grad()
def _damped_step(module: nn.Module, latent_shape: Sequence[int], flat: torch.Tensor, zf: torch.Tensor,
                 residual: torch.Tensor, loss: torch.Tensor, score: torch.Tensor, rows: torch.Tensor,
                 normal: torch.Tensor, gradient: torch.Tensor, damping: torch.Tensor, metric: Metric,
                 basis: torch.Tensor | None = None) -> torch.Tensor:
    """One damped Gauss-Newton step of items ``rows`` from their normal equations (within the span
    of ``basis`` where given), kept where it lowers the MSE: ``zf``, ``residual``, ``loss`` and
    ``score`` are updated in place; returns which of ``rows`` improved."""
    diagonal = torch.diagonal(normal, dim1=1, dim2=2)
    step = torch.linalg.solve(normal + torch.diag_embed(damping[:, None] * (diagonal + 1e-9)), -gradient)
    if basis is not None:
        step = step @ basis.T
    new_residual = module((zf[rows] + step).view(-1, *latent_shape)).flatten(1) - flat[rows]
    new = (new_residual**2).mean(1)
    better = new < loss[rows]
    went = rows[better]
    zf[went] += step[better]
    residual[went], loss[went] = new_residual[better], new[better]
    score[went] = torch.minimum(score[went], metric(new_residual[better]))
    return better


@torch.no_grad()
def _sketched_steps(module: nn.Module, latent_shape: Sequence[int], flat: torch.Tensor, zf: torch.Tensor,
                    residual: torch.Tensor, loss: torch.Tensor,
                    score: torch.Tensor, idx: torch.Tensor, basis: torch.Tensor, jac: torch.Tensor, accept: float,
                    floor: float, metric: Metric) -> None:
    """``SKETCH_STEPS`` damped Gauss-Newton steps of items ``idx`` within the span of ``basis``, with
    their sketched Jacobians ``jac`` (m, out_dim, k); the item tensors are updated in place where a
    step lowers the MSE. An item stops trying once it is attributed or at the quantisation floor."""
    normal = jac.transpose(1, 2) @ jac
    damping = torch.full((len(idx),), 1e-3, device=zf.device, dtype=zf.dtype)
    trying = torch.arange(len(idx), device=zf.device)
    for _ in range(SKETCH_STEPS):
        rows = idx[trying]
        gradient = (jac[trying].transpose(1, 2) @ residual[rows, :, None])[..., 0]
        better = _damped_step(module, latent_shape, flat, zf, residual, loss, score, rows, normal[trying], gradient,
                              damping[trying], metric, basis)
        damping[trying] = torch.where(better, (damping[trying] / 5).clamp(min=MIN_DAMPING), damping[trying] * 5)
        trying = trying[(score[rows] > accept) & (loss[rows] > 2 * floor)]
        if not len(trying):
            return


def _whitened_problem(module: nn.Module, differentiate: Differentiate, targets: torch.Tensor, whitened: ResidualMetric
                      ) -> tuple[Callable[[torch.Tensor], torch.Tensor], Differentiate, torch.Tensor, Metric]:
    """The least-squares problem of :func:`lm_trajectories` in ``whitened``'s units: the outputs,
    the Jacobians and the targets mapped by its linear :meth:`~ResidualMetric.whiten` (so their
    mean squared residual is the metric), and the metric of those residuals (their mean square)."""
    def outputs(z: torch.Tensor) -> torch.Tensor:
        return whitened.whiten(module(z))

    def jacobians(z: torch.Tensor, *basis: torch.Tensor) -> torch.Tensor:
        return whitened.whiten_columns(differentiate(z, *basis))

    return outputs, jacobians, whitened.whiten(targets), mse


def _lm_chunk(module: nn.Module, targets: torch.Tensor, z: torch.Tensor, iterations: int, floor: float,
              exits: Exits, chord_steps: int, metric: Metric, differentiate: Differentiate,
              basis: torch.Tensor | None = None, reached: torch.Tensor | None = None) -> torch.Tensor:
    latent_shape = z.shape[1:]
    flat = targets.flatten(1)
    zf = z.view(len(z), -1)
    n, dim = zf.shape
    device = targets.device

    with torch.no_grad():
        residual = module(z).flatten(1) - flat
    loss = (residual**2).mean(1)
    score = metric(residual)  # the lowest loss in the metric so far: what the trajectory and exits hold
    if reached is not None:
        score = torch.minimum(score, reached)
    trajectory = score[:, None].repeat(1, iterations + 1)
    screen = torch.tensor([*exits.screen[:iterations], *[math.inf] * (iterations + 1 - len(exits.screen[:iterations]))],
                          device=device, dtype=loss.dtype)
    damping = torch.full_like(loss, 1e-3)
    jacobian_of = loss.new_empty(n, flat.shape[1], dim)
    normal = loss.new_empty(n, dim, dim)
    gradient = loss.new_empty(n, dim)
    jacobians = torch.zeros(n, dtype=torch.long, device=device)
    rejected = torch.zeros_like(jacobians)
    attempts = torch.zeros_like(jacobians)  # steps tried with the item's current Jacobian
    moved = torch.zeros(n, dtype=torch.bool, device=device)  # since its current Jacobian was taken
    stale = torch.ones(n, dtype=torch.bool, device=device)  # the next step needs a new Jacobian
    before = torch.full_like(loss, math.inf)  # the loss when the current Jacobian was taken

    def going(idx: torch.Tensor) -> torch.Tensor:
        settled = stale[idx] & ((score[idx] <= exits.accept) | (score[idx] > screen[jacobians[idx]])
                                | (jacobians[idx] >= iterations) | (loss[idx] > (1 - STALL) * before[idx]))
        return (loss[idx] > 2 * floor) & (rejected[idx] < MAX_REJECTED) & ~settled

    columns = torch.arange(iterations + 1, device=device)
    active = torch.zeros(n, dtype=torch.bool, device=device)
    every = torch.arange(n, device=device)
    active[every] = going(every)
    if basis is not None and iterations and (idx := active.nonzero().squeeze(1)).numel():
        # the first Jacobian is sketched: k tangents along the basis, steps in its span
        sketched = differentiate(zf[idx].view(-1, *latent_shape), basis)
        _sketched_steps(module, latent_shape, flat, zf, residual, loss, score, idx, basis, sketched, exits.accept, floor,
                        metric)
        jacobians[idx] = 1  # stale stays set: the next Jacobian is the full one; ``before`` stays
        trajectory[idx, 1:] = score[idx, None]  # infinite: a stall within the span says nothing of the rest
        active[idx] = going(idx)
    while (idx := active.nonzero().squeeze(1)).numel():
        need = idx[stale[idx]]
        if len(need):
            jac = jacobian_of[need] = differentiate(zf[need].view(-1, *latent_shape))
            with torch.no_grad():
                normal[need] = jac.transpose(1, 2) @ jac
                gradient[need] = (jac.transpose(1, 2) @ residual[need, :, None])[..., 0]
            stale[need], jacobians[need], attempts[need], moved[need] = False, jacobians[need] + 1, 0, False
            before[need] = loss[need]
        better = _damped_step(module, latent_shape, flat, zf, residual, loss, score, idx, normal[idx], gradient[idx],
                              damping[idx], metric)
        went = idx[better]
        with torch.no_grad():  # the chord: the same Jacobian, the gradient of the new residual
            gradient[went] = (jacobian_of[went].transpose(1, 2) @ residual[went, :, None])[..., 0]
        # only a step that fails where the Jacobian was taken counts towards giving up; one that
        # fails after the item has moved says the chord is out of date, not that the item is done
        failed = idx[~better]
        rejected[failed] += (~moved[failed]).long()
        moved[went], rejected[went] = True, 0
        attempts[idx] += 1
        # a new Jacobian once this one has served its steps and the item has moved away from it
        stale[idx] = moved[idx] & (attempts[idx] >= chord_steps)
        damping[idx] = torch.where(better, (damping[idx] / 5).clamp(min=MIN_DAMPING), damping[idx] * 5)
        trajectory[idx] = torch.where(columns >= jacobians[idx, None], score[idx, None], trajectory[idx])
        active[idx] = going(idx)
    return trajectory
