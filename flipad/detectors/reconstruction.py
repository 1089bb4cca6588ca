"""Reconstruction-loss attribution by full-generator inversion (Wang et al., NeurIPS 2023).

A generator reconstructs its own outputs from some latent with a far lower loss than anything
else. For each input the latent space is searched with Adam from several starts (batched over
inputs and starts): the best of many random latents, screened by one forward pass. Each item
stops early once its best loss stalls, and the best pixel MSE in the generator's output range is
the anomaly score. It needs no final-layer
structure, so it covers generators FLIPAD refuses (skip connections into the output,
non-invertible output activations).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..generators.adapter import weights_fingerprint
from .calibration import CalibratedDetector, check_fnr
from ..io.data import check_sample_shape, quantize
from ..device import resolve_device
from .persist import check_generator, read_saved, write_saved

__all__ = ["ReconstructionConfig", "ReconstructionLossDetector", "generate_samples", "reconstruction_losses"]

logger = logging.getLogger(__name__)

VALIDATION_SEED_OFFSET = 3000
SCREEN_BATCH = 1024  # latents per forward pass when screening the starts


@dataclass(frozen=True)
class ReconstructionConfig:
    """The latent search: Adam for up to ``steps`` from ``starts`` latents per item.

    The starts are the ``candidates`` random latents with the lowest loss (one forward pass each;
    ``candidates == starts`` skips the screening). An item stops when its best loss improved by
    less than ``tol`` (relative) over ``patience`` steps. ``batch_size`` counts items (each with
    all its starts).
    """

    steps: int = 600
    lr: float = 0.05
    candidates: int = 64
    starts: int = 3
    tol: float = 1e-3
    patience: int = 50
    batch_size: int = 128
    seed: int = 0

    def __post_init__(self):
        if self.candidates < self.starts:
            raise ValueError(f"candidates ({self.candidates}) must be at least starts ({self.starts})")

    @classmethod
    def from_dict(cls, saved: dict) -> ReconstructionConfig:
        """The config of a saved detector; searches saved before screening existed keep their
        unscreened random starts (their thresholds were set with them)."""
        return cls(**{"candidates": saved["starts"], **saved})


def _output_range(module: nn.Module, latent_shape: Sequence[int], device: torch.device) -> tuple[float, float]:
    """(-1, 1) for generators whose samples reach below zero (tanh-like), else (0, 1)."""
    with torch.no_grad():
        out = module(torch.randn(16, *latent_shape, generator=torch.Generator().manual_seed(0)).to(device))
    return (-1.0, 1.0) if float(out.min()) < -1e-3 else (0.0, 1.0)


def generate_samples(
    module: nn.Module,
    latent_shape: Sequence[int],
    n: int,
    seed: int,
    output_range: tuple[float, float],
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """``n`` samples of any generator from standard-normal latents drawn for ``seed`` (the latents
    ``GeneratorAdapter.generate`` draws), images quantised to 8 bits within ``output_range``."""
    latents = torch.randn(n, *latent_shape, generator=torch.Generator().manual_seed(seed))
    chunks = []
    with torch.no_grad():
        for start in range(0, n, 256):
            chunks.append(module(latents[start : start + 256].to(device)).cpu())
    samples = torch.cat(chunks)
    return quantize(samples, *output_range) if samples.dim() == 4 else samples.numpy()


def reconstruction_losses(
    module: nn.Module,
    latent_shape: Sequence[int],
    targets: torch.Tensor,
    config: ReconstructionConfig,
    progress: bool = False,
) -> torch.Tensor:
    """Best per-item MSE of ``module(z)`` to ``targets`` (float, in the output range) over the search."""
    device = next(module.parameters()).device
    out = []
    for start in tqdm(range(0, len(targets), config.batch_size), desc="latent search", disable=not progress):
        batch = targets[start : start + config.batch_size].to(device)
        seed = config.seed + start
        out.append(_search(module, latent_shape, batch, config, seed).cpu())
    return torch.cat(out) if out else torch.empty(0)


def _search(
    module: nn.Module, latent_shape: Sequence[int], targets: torch.Tensor, config: ReconstructionConfig, seed: int
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
        per_start = ((module(z) - targets[active].repeat_interleave(starts, dim=0)) ** 2).flatten(1).mean(1)
        best = torch.minimum(best, per_start.detach().view(-1, starts).min(1).values)
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


class ReconstructionLossDetector(CalibratedDetector):
    """Attribution by the best reconstruction loss of a full-generator latent search.

    Works for any differentiable generator mapping ``(N, *latent_shape)`` latents to samples.
    The score has nothing to learn: ``fit`` only sets the thresholds from held-out samples of
    the generator (drawn when not given). ``fit`` takes ``generated``/``real``/``negatives`` for
    the same surface as :class:`FlipadDetector`; this method does not use them.
    """

    def __init__(
        self,
        module: nn.Module,
        latent_shape: Sequence[int] | None = None,
        fnr: Sequence[float] = (0.005,),
        n_validation: int = 1000,
        config: ReconstructionConfig | None = None,
        output_range: tuple[float, float] | None = None,
        device: str = "auto",
        progress: bool = True,
    ):
        self.module = module
        self.latent_shape = latent_shape
        self.fnr = check_fnr(fnr)
        self.n_validation = n_validation
        self.config = config or ReconstructionConfig()
        self.output_range = output_range
        self.device = device
        self.progress = progress

    def _prepare(self) -> None:
        self.device_ = resolve_device(self.device)
        self.module_ = self.module.to(self.device_).eval()
        shape = self.latent_shape or getattr(self.module, "latent_shape", None)
        if shape is None:
            raise ValueError("latent_shape is required: the module has no latent_shape attribute")
        self.latent_shape_ = tuple(int(s) for s in shape)
        self.range_ = self.output_range or _output_range(self.module_, self.latent_shape_, self.device_)
        with torch.no_grad():
            probe = self.module_(torch.zeros(2, *self.latent_shape_, device=self.device_))
        self.output_shape_ = tuple(probe.shape[1:])
        self.fingerprint_ = weights_fingerprint(self.module_)

    def generate(self, n: int, seed: int) -> np.ndarray:
        """``n`` samples of the generator, quantised to 8 bits for images."""
        return generate_samples(self.module_, self.latent_shape_, n, seed, self.range_, self.device_)

    def _to_range(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        check_sample_shape(samples, self.output_shape_)
        t = torch.as_tensor(np.ascontiguousarray(samples)) if isinstance(samples, np.ndarray) else samples
        if t.dtype == torch.uint8:
            low, high = self.range_
            return t.float().div(255.0).mul(high - low).add(low)
        return t.float()

    def fit(
        self,
        generated: np.ndarray | None = None,
        real: np.ndarray | None = None,
        negatives: Sequence[np.ndarray] | np.ndarray | None = None,
        validation: np.ndarray | None = None,
    ) -> ReconstructionLossDetector:
        """Set the thresholds from held-out samples of the generator (``validation``, else drawn fresh). Returns self."""
        self._prepare()
        if validation is None:
            validation = self.generate(self.n_validation, seed=VALIDATION_SEED_OFFSET + self.config.seed)
        self._calibrate(self._losses(validation))
        self.fit_info_ = {"n_validation": len(validation), "validation_loss_median": float(self.validation_scores_.median())}
        return self

    def _losses(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        return reconstruction_losses(
            self.module_, self.latent_shape_, self._to_range(samples), self.config, progress=self.progress
        )

    def anomaly_scores(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Best reconstruction MSE per sample (small = the generator can make it)."""
        self._check_fitted()
        return self._losses(samples)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The shape of one sample of the generator."""
        self._check_fitted()
        return self.output_shape_

    def save(self, path: str | Path) -> Path:
        """Write ``config.json`` and ``tensors.safetensors`` into the folder ``path`` (no pickles)."""
        self._check_fitted()
        config = {"generator_sha256": self.fingerprint_, "latent_shape": list(self.latent_shape_),
                  "output_shape": list(self.output_shape_), "output_range": list(self.range_), "fnr": list(self.fnr),
                  "n_validation": self.n_validation, "search": asdict(self.config), "fit_info": self.fit_info_}
        return write_saved(path, "reconstruction", config, {"validation_scores": self.validation_scores_})

    @classmethod
    def load(cls, path: str | Path, module: nn.Module, device: str = "auto") -> ReconstructionLossDetector:
        """Load a detector saved by :meth:`save` for the same generator (checked by weight hash)."""
        config, tensors = read_saved(path, "reconstruction")
        det = cls(module, config["latent_shape"], config["fnr"], config["n_validation"],
                  ReconstructionConfig.from_dict(config["search"]), tuple(config["output_range"]), device, progress=False)
        det._prepare()
        check_generator(path, config["generator_sha256"], det.fingerprint_)
        det._calibrate(tensors["validation_scores"])
        det.fit_info_ = config["fit_info"]
        return det
