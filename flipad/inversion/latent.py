"""Full-generator latent search: the best reconstruction of each target by ``module(z)``.

:func:`reconstruction_losses` runs the configured search: ``method="adam"``, the first-order search
(Adam from the best of many screened random latents, batched over items and starts, each item
stopping once its best loss stalls), or ``method="encoder-lm"``, an amortised encoder's guess
refined by Levenberg-Marquardt (:mod:`flipad.inversion.amortised`). Both lower the pixel MSE;
an item's loss is measured in the configured metric (:mod:`flipad.inversion.metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..progress import report

from .amortised import Differentiate, Exits, LatentEncoder, encoder_lm_trajectories, quantisation_floor
from .metrics import METRICS, ResidualMetric

__all__ = ["SEARCH_METHODS", "ReconstructionConfig", "reconstruction_losses", "reconstruction_trajectories"]

SCREEN_BATCH = 1024  # latents per forward pass when screening the starts
SEARCH_METHODS = ("adam", "encoder-lm")
OBJECTIVES = ("mse", "metric")  # what the encoder-lm search's Levenberg-Marquardt steps minimise


@dataclass(frozen=True)
class ReconstructionConfig:
    """The latent search.

    ``method="adam"``: Adam for up to ``steps`` from ``starts`` latents per item. The starts are
    the ``candidates`` random latents with the lowest loss (one forward pass each;
    ``candidates == starts`` skips the screening). An item stops when its best loss improved by
    less than ``tol`` (relative) over ``patience`` steps. ``batch_size`` counts items (each with
    all its starts).

    ``method="encoder-lm"``: an encoder trained for at most ``encoder_steps`` batches of the
    generator's own pairs at fit time, fewer where they would cost more than ``encoder_tflop``
    TFLOP (0: no budget; :func:`~flipad.inversion.amortised.encoder_steps_within`), gives each
    item's start, which ``fixed_point_steps`` steps ``z + E(x) - E(G(z))`` refine at one encoder
    and one generator pass each (:func:`~flipad.inversion.amortised.fixed_point_trajectories`), then
    at most ``lm_iterations`` Levenberg-Marquardt Jacobians (an item stops at twice the
    quantisation floor). ``seed`` seeds the encoder's training.
    ``sketch``: at most this many latent directions (those that move the output most) the first
    step works in, a cheap sketched Jacobian (:func:`~flipad.inversion.amortised.sketch_basis`);
    0 takes every Jacobian in full.

    ``metric``: what an item's loss is, the lowest among the latents the search reached: ``jpeg``
    (the residual in JPEG's quantisation steps, so recompressed copies of the generator's outputs
    stay close) or ``mse``. ``objective`` (``encoder-lm``): what the Levenberg-Marquardt steps
    minimise, ``mse`` (the pixel MSE) or ``metric`` (the loss in ``metric`` itself, a quadratic
    form of the residual: :meth:`~flipad.inversion.metrics.ResidualMetric.whiten`).
    """

    steps: int = 600
    lr: float = 0.05
    candidates: int = 64
    starts: int = 3
    tol: float = 1e-3
    patience: int = 50
    batch_size: int = 128
    seed: int = 0
    method: str = "adam"
    encoder_steps: int = 600
    encoder_tflop: float = 48.0
    fixed_point_steps: int = 8
    lm_iterations: int = 10
    metric: str = "jpeg"
    sketch: int = 16
    objective: str = "mse"

    def __post_init__(self):
        if self.method not in SEARCH_METHODS:
            raise ValueError(f"unknown search method {self.method!r}; use one of {', '.join(SEARCH_METHODS)}")
        if self.candidates < self.starts:
            raise ValueError(f"candidates ({self.candidates}) must be at least starts ({self.starts})")
        if self.metric not in METRICS:
            raise ValueError(f"unknown reconstruction metric {self.metric!r}; use one of {', '.join(METRICS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown search objective {self.objective!r}; use one of {', '.join(OBJECTIVES)}")

    @classmethod
    def from_dict(cls, saved: dict) -> ReconstructionConfig:
        """The config of a saved detector; searches saved before screening, metrics, the sketch, the
        encoder's budget or the fixed-point steps existed keep their unscreened random starts, the
        MSE, full Jacobians, the batches they trained and the encoder's start as it was (their
        thresholds were set with them)."""
        return cls(**{"candidates": saved["starts"], "metric": "mse", "sketch": 0, "encoder_tflop": 0.0,
                      "fixed_point_steps": 0, **saved})


def reconstruction_losses(module: nn.Module, latent_shape: Sequence[int], targets: torch.Tensor,
                          config: ReconstructionConfig, output_range: tuple[float, float], **options: Any) -> torch.Tensor:
    """Best per-item loss of ``module(z)`` to ``targets`` (float, in ``output_range``) over the
    search: the last column of :func:`reconstruction_trajectories` (the same ``options``)."""
    return reconstruction_trajectories(module, latent_shape, targets, config, output_range, **options)[:, -1]


def reconstruction_trajectories(
    module: nn.Module,
    latent_shape: Sequence[int],
    targets: torch.Tensor,
    config: ReconstructionConfig,
    output_range: tuple[float, float],
    progress: bool = False,
    encoder: LatentEncoder | None = None,
    exits: Exits = Exits(),
    differentiate: Differentiate | None = None,
    basis: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per item, the loss in ``config.metric`` after each stage of the search, ``(n, stages)``; the
    last column is the result. ``targets`` lie in ``output_range`` (it sets the metric's 8-bit step
    and the quantisation floor an LM item stops at). ``encoder-lm`` needs the ``encoder`` trained
    for ``module``: the start, the loss after each fixed-point step and after each Jacobian
    (:func:`~flipad.inversion.amortised.encoder_lm_trajectories`, stopping at ``exits``, taking
    Jacobians with ``differentiate``, the first sketched along ``basis`` where given); ``adam``:
    the result alone."""
    if config.method == "encoder-lm" and encoder is None:
        raise ValueError("the encoder-lm search needs the generator's trained encoder")
    metric = ResidualMetric(config.metric, targets.shape[1:], output_range)
    floor = quantisation_floor(output_range)
    device = next(module.parameters()).device
    columns = config.fixed_point_steps + config.lm_iterations + 1 if config.method == "encoder-lm" else 1
    out = []
    for start in tqdm(range(0, len(targets), config.batch_size), desc="latent search", disable=not progress):
        batch = targets[start : start + config.batch_size].to(device)
        if config.method == "encoder-lm":
            out.append(encoder_lm_trajectories(module, encoder, batch, config.fixed_point_steps, config.lm_iterations,
                                               floor, exits, metric, differentiate, basis,
                                               metric if config.objective == "metric" else None).cpu())
        else:
            out.append(_search(module, latent_shape, batch, config, config.seed + start, metric).cpu()[:, None])
        report(len(batch))
    return torch.cat(out) if out else torch.empty(0, columns)


def _search(
    module: nn.Module, latent_shape: Sequence[int], targets: torch.Tensor, config: ReconstructionConfig, seed: int,
    metric: ResidualMetric,
) -> torch.Tensor:
    n, starts, device = len(targets), config.starts, targets.device
    gen = torch.Generator().manual_seed(seed)
    z = _starts(module, latent_shape, targets, config, gen).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=config.lr)
    result = torch.full((n,), float("inf"), device=device)
    active = torch.arange(n, device=device)  # items still searching
    best = result.clone()
    history: list[torch.Tensor] = []
    check = max(1, config.patience // 5)
    for step in range(1, config.steps + 2):
        residual = (module(z) - targets[active].repeat_interleave(starts, dim=0)).flatten(1)
        per_start = (residual**2).mean(1)
        best = torch.minimum(best, metric(residual.detach()).view(-1, starts).min(1).values)
        if step > config.steps:
            break  # the loss after the last update is counted, no further step
        # only the latents (not the generator's weights) get gradients
        (z.grad,) = torch.autograd.grad(per_start.sum(), [z])
        opt.step()
        if step % check:
            continue
        history = (history + [best.clone()])[-6:]
        if len(history) < 6:
            continue
        stalled = history[0] - history[-1] <= config.tol * history[-1]
        if stalled.any():
            result[active[stalled]] = best[stalled]
            keep = ~stalled
            if not keep.any():
                return result
            rows = keep.repeat_interleave(starts)
            state = opt.state[z]
            z = z.detach()[rows].requires_grad_(True)
            opt = torch.optim.Adam([z], lr=config.lr)
            opt.state[z] = {"step": state["step"], "exp_avg": state["exp_avg"][rows],
                            "exp_avg_sq": state["exp_avg_sq"][rows]}
            active, best = active[keep], best[keep]
            history = [h[keep] for h in history]
    result[active] = best
    return result


def _starts(
    module: nn.Module, latent_shape: Sequence[int], targets: torch.Tensor, config: ReconstructionConfig, gen: torch.Generator
) -> torch.Tensor:
    """``(len(targets) * starts, *latent_shape)`` latents: per item, the ``starts`` of its
    ``candidates`` random latents whose outputs are closest to it."""
    n, starts, device = len(targets), config.starts, targets.device
    if config.candidates == starts:
        return torch.randn(n * starts, *latent_shape, generator=gen).to(device)
    candidates = torch.randn(n, config.candidates, *latent_shape, generator=gen).to(device)
    losses = torch.empty(n, config.candidates, device=device)
    chunk = max(1, SCREEN_BATCH // config.candidates)  # items per forward pass, to bound the memory
    with torch.no_grad():
        for i in range(0, n, chunk):
            outputs = module(candidates[i : i + chunk].flatten(0, 1)).unflatten(0, (-1, config.candidates))
            losses[i : i + chunk] = ((outputs - targets[i : i + chunk, None]) ** 2).flatten(2).mean(2)
    best = losses.topk(starts, dim=1, largest=False).indices
    return candidates[torch.arange(n, device=device)[:, None], best].reshape(n * starts, *latent_shape)
