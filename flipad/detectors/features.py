"""Features the detector is trained on, behind one interface.

- ``flipad``: the recovered penultimate activation ``z_bar + d*`` (the paper), with optional
  max-pooling, centre crop and channel selection.
- ``raw`` (RAWPAD): pixels, downsampled to at most 32x32.
- ``dct`` (DCTPAD): ``log(|DCT2(x)| + 1e-10)`` per channel.

Every kind is then scaled per element as ``(f - mean_G) / (std_G + 0.05)`` with statistics of
the generator's training features only (:class:`FeatureScaler`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.fft
import torch
import torch.nn.functional as F

from ..generators.adapter import GeneratorAdapter
from ..inversion.lasso import LassoOptions

__all__ = ["FeatureConfig", "FeatureExtractor", "FeatureScaler", "FeatureSet", "FEATURE_KINDS"]

FEATURE_KINDS = ("flipad", "raw", "dct")
# Features need the recovered activation, not the optimum to the last digit: a 600-iteration
# FISTA budget (4 continuation stages), 0.04 s per 32x32 sample on two CPU threads (see
# docs/benchmarks.md).
DETECTOR_INVERSION = {"method": "fista", "max_iter": 600, "continuation_stages": 4, "stage_iters": 100}


@dataclass(frozen=True)
class FeatureConfig:
    """Which features to compute and how.

    ``pool`` max-pools image activations by that factor; ``"auto"`` (the default) pools by 2
    when the activations are as large as the generator's output (a stride-1 final convolution,
    as after upsampling), which reproduces the paper's choices (LSGAN's 64x64 activations pooled
    to 32x32, DCGAN's left alone) and keeps Deep SAD's input at most half the output's size.
    ``crop`` centre-crops them to that size; ``channels`` keeps only those channels.
    ``fold_upsampling`` inverts a final ``Conv2d`` that follows nearest upsampling together with
    the upsampling (:meth:`GeneratorAdapter.folded`), recovering the map before upsampling (the
    default; saved configs from before it existed load without it). ``bounded``/``censored`` solve the constrained,
    censored inversion (see :meth:`GeneratorAdapter.constraints`) instead of the paper's lasso.
    ``inversion``: the :class:`~flipad.inversion.lasso.LassoOptions` of the features (a dict of
    its fields is accepted, as saved configs hold it); without a
    ``method`` it is FISTA, the solver the detector's features were measured with.
    """

    kind: str = "flipad"
    alpha: float = 5e-4
    pool: int | str | None = "auto"
    crop: int | None = None
    channels: tuple[int, ...] | None = None
    raw_size: int = 32
    scale_eps: float = 0.05
    bounded: bool = False
    censored: bool = False
    fold_upsampling: bool = True
    inversion: LassoOptions = field(default_factory=lambda: LassoOptions(**DETECTOR_INVERSION))

    def __post_init__(self):
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"unknown feature kind {self.kind!r}; use one of {FEATURE_KINDS}")
        if isinstance(self.pool, str) and self.pool != "auto":
            raise ValueError(f"pool must be an integer, None or 'auto', got {self.pool!r}")
        if isinstance(self.inversion, dict):  # saved configs; those from before the method was recorded are FISTA
            object.__setattr__(self, "inversion", LassoOptions(**{"method": "fista", **self.inversion}))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["channels"] = list(self.channels) if self.channels is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> FeatureConfig:
        data = {"fold_upsampling": False, **data}  # configs saved before folding existed
        if data.get("channels") is not None:
            data["channels"] = tuple(data["channels"])
        return cls(**data)


@dataclass(frozen=True)
class FeatureSet:
    """Unscaled features of one sample set, with per-item inversion diagnostics (NaN for raw/dct)."""

    features: torch.Tensor
    residual: np.ndarray  # ||r - A d|| / ||r|| of the final-layer inversion
    sparsity: np.ndarray  # fraction of non-zero deviations from the anchor
    iterations: np.ndarray
    converged: np.ndarray  # bool: the solver's stopping rule held before its budget
    gap: np.ndarray  # certified bound on the relative objective gap
    seconds: float

    def summary(self) -> dict[str, float]:
        """Median/max statistics of the inversion for logging (NaN for raw/dct features)."""
        return {"iterations_median": float(np.nanmedian(self.iterations)), "iterations_max": float(np.nanmax(self.iterations)),
                "converged_fraction": float(self.converged.mean()), "gap_median": float(np.nanmedian(self.gap)),
                "residual_median": float(np.nanmedian(self.residual))}

    def __len__(self) -> int:
        return len(self.features)


class FeatureExtractor:
    """Computes unscaled features of one kind for samples of the adapter's output shape: FLIPAD's
    expensive stage (:class:`~flipad.detectors.base.Stage`)."""

    name = "compute-features"

    def __init__(self, adapter: GeneratorAdapter, config: FeatureConfig):
        self.adapter = adapter
        self.config = config
        self.inversion_adapter = adapter.folded() if config.kind == "flipad" and config.fold_upsampling else adapter

    def __call__(self, samples: np.ndarray | torch.Tensor, progress: bool = False) -> torch.Tensor:
        return self.compute(samples, progress).features

    def compute(self, samples: np.ndarray | torch.Tensor, progress: bool = False) -> FeatureSet:
        """Features of ``samples`` and, for the ``flipad`` kind, the inversion's per-item diagnostics."""
        start = time.perf_counter()
        kind = self.config.kind
        if kind != "flipad":
            x = self.adapter.to_output_range(samples)
            features = self._raw(x) if kind == "raw" else self._dct(x)
            nan = np.full(len(features), np.nan)
            return FeatureSet(features, nan, nan, nan, np.ones(len(features), bool), nan, time.perf_counter() - start)
        result = self.inversion_adapter.invert(
            samples, alpha=self.config.alpha, return_result=True, progress=progress, warn_on_cap=False,
            bounded=self.config.bounded, censored=self.config.censored, options=self.config.inversion,
        )  # the detector's cap is a deliberate budget (DETECTOR_INVERSION), not a failure
        return FeatureSet(
            self._reshape_activations(result.activations), result.residual.double().numpy(), result.sparsity.numpy(),
            result.iterations.double().numpy(), result.converged.numpy(), result.gap.double().numpy(),
            time.perf_counter() - start,
        )

    @property
    def device(self) -> str:
        """Where the inversion runs ("cpu", "cuda")."""
        return self.inversion_adapter.device.type

    def run(self, samples: np.ndarray | torch.Tensor) -> FeatureSet:
        """The stage: :meth:`compute` with progress reports."""
        return self.compute(samples, progress=True)

    def fingerprint(self) -> str:
        """A hash of everything the features depend on besides the samples: the generator's
        weights, its anchor, the device kind and the configuration."""
        adapter = self.inversion_adapter
        parts = {"generator": adapter.fingerprint, "anchor": [adapter.seed, adapter.anchor_samples],
                 "device": adapter.device.type, "features": self.config.to_dict()}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def _reshape_activations(self, acts: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if acts.dim() != 4:
            return acts
        if cfg.channels is not None:
            acts = acts[:, list(cfg.channels)]
        pool = self.pool_factor(tuple(acts.shape[1:]))
        if pool > 1:
            acts = F.max_pool2d(acts, pool)
        if cfg.crop:
            h, w = acts.shape[-2:]
            top, left = (h - cfg.crop) // 2, (w - cfg.crop) // 2
            acts = acts[..., top : top + cfg.crop, left : left + cfg.crop]
        return acts

    def pool_factor(self, activation_shape: tuple[int, ...]) -> int:
        """The max-pooling factor applied to activations of this (C, H, W) shape."""
        if self.config.pool != "auto":
            return int(self.config.pool or 1)
        if len(activation_shape) != 3:
            return 1
        as_large = all(a >= o for a, o in zip(activation_shape[-2:], self.adapter.output_shape[-2:]))
        return 2 if as_large else 1

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and max(x.shape[-2:]) > self.config.raw_size:
            x = F.interpolate(x, size=(self.config.raw_size,) * 2, mode="area")
        return x

    @staticmethod
    def _dct(x: torch.Tensor) -> torch.Tensor:
        axes = (-2, -1) if x.dim() == 4 else (-1,)
        coeffs = scipy.fft.dctn(x.numpy().astype(np.float64), axes=axes, norm="ortho")
        return torch.from_numpy(np.log(np.abs(coeffs) + 1e-10)).float()


class FeatureScaler:
    """Per-element ``(f - mean) / (std + eps)`` with statistics of the generator's training features."""

    def __init__(self, eps: float = 0.05):
        self.eps = eps
        self.mean_: torch.Tensor | None = None
        self.std_: torch.Tensor | None = None

    def fit(self, generated_features: torch.Tensor) -> FeatureScaler:
        if len(generated_features) < 2:
            raise ValueError("feature scaling needs at least two samples of the generator")
        self.mean_ = generated_features.mean(0)
        self.std_ = generated_features.std(0)
        return self

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        if self.mean_ is None:
            raise RuntimeError("FeatureScaler is not fitted")
        return (features - self.mean_) / (self.std_ + self.eps)
