"""``FlipadDetector``: "was this sample made by this generator?", scikit-learn style.

Fitting draws (or takes) 8-bit samples of the generator, computes features
(FLIPAD activations by default, or RAWPAD/DCTPAD), scales them with the
generator's statistics, trains Deep SAD with the generator's samples as
normals and real data (plus any other negatives) as anomalies, and sets one
threshold per tolerable FNR on held-out validation samples of the generator.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..device import resolve_device
from ..generators.adapter import GeneratorAdapter
from .base import (
    INLINE,
    Detector,
    DetectorSettings,
    Scores,
    Seeds,
    Stages,
    register_kind,
)
from .calibration import NotFittedError, check_fnr
from .deepsad import ANOMALY, NORMAL, DeepSADConfig, DeepSADTrainer, build_encoder
from .features import FEATURE_KINDS, FeatureConfig, FeatureExtractor, FeatureScaler
from .persist import check_generator, read_saved, write_saved

__all__ = ["FlipadDetector", "NotFittedError", "stack_negatives"]

logger = logging.getLogger(__name__)


def stack_negatives(real: np.ndarray | None, negatives: Sequence[np.ndarray] | np.ndarray | None) -> np.ndarray:
    parts = [] if real is None else [real]
    if negatives is not None:
        parts += [negatives] if isinstance(negatives, np.ndarray) else list(negatives)
    if not parts:
        raise ValueError("fit needs negatives: real data and/or samples of other generators")
    return np.concatenate([np.asarray(p) for p in parts])


@dataclass(frozen=True)
class FlipadSettings:
    """FLIPAD's options (``--set flipad.KEY=VALUE``)."""

    features: str = field(default="flipad", metadata={"help": "the features Deep SAD learns from: flipad (the final "
                                                               "layer's inverted activation), raw or dct"})
    constrained: bool = field(default=False, metadata={"help": "bounded + censored inversion (open-world)"})
    epochs: int = field(default=DeepSADConfig.epochs, metadata={"help": "Deep SAD training epochs"})

    def __post_init__(self) -> None:
        if self.features not in FEATURE_KINDS:
            raise ValueError(f"flipad.features {self.features!r}: use one of {', '.join(FEATURE_KINDS)}")
        if self.epochs < 1:
            raise ValueError(f"flipad.epochs {self.epochs}: use at least 1")


@register_kind
class FlipadDetector(Detector):
    """Single-model attribution detector for the generator behind ``adapter``.

    Parameters mirror the paper: ``features`` ("flipad", "raw", "dct" or a FeatureConfig),
    ``fnr`` (tolerable false-negative rates; the first is the default decision threshold),
    ``n_generated``/``n_validation`` (samples drawn from the generator when not given),
    ``deep_sad`` (training settings).
    """

    def __init__(
        self,
        adapter: GeneratorAdapter,
        features: str | FeatureConfig = "flipad",
        fnr: Sequence[float] = (0.005,),
        n_generated: int = 2000,
        n_validation: int = 1000,
        deep_sad: DeepSADConfig | None = None,
        device: str = "auto",
        seed: int = 0,
        progress: bool = True,
    ):
        self.adapter = adapter
        self.features = features
        self.fnr = check_fnr(fnr)
        self.n_generated = n_generated
        self.n_validation = n_validation
        self.deep_sad = deep_sad
        self.device = device
        self.seed = seed
        self.progress = progress

    kind = "flipad"
    description = "FLIPAD: final-layer inversion + Deep SAD"
    Settings = FlipadSettings
    diagnostics = {"residual": "the final-layer inversion's data residual",
                   "sparsity": "the share of non-zero entries of the inverted activation's deviation"}

    @classmethod
    def from_module(cls, module: nn.Module, latent_shape: Sequence[int] | None = None, **options: Any) -> FlipadDetector:
        """Trace ``module``'s final layer (``NotInvertibleError`` when FLIPAD cannot invert it) and
        wrap it; ``options`` are this class's keyword arguments."""
        adapter = GeneratorAdapter.from_module(module, latent_shape, device=options.get("device", "auto"),
                                               seed=options.get("seed", 0))
        return cls(adapter, **options)

    @classmethod
    def from_settings(cls, module: nn.Module, latent_shape: Sequence[int] | None, settings: DetectorSettings) -> FlipadDetector:
        return cls.from_module(module, latent_shape, **cls.options(settings))

    @classmethod
    def options(cls, settings: DetectorSettings) -> dict[str, Any]:
        """This class's keyword arguments for ``settings``."""
        own = settings.of(cls)
        features = FeatureConfig(kind=own.features, bounded=own.constrained, censored=own.constrained)
        return {"features": features, "fnr": settings.fnr, "n_generated": settings.n_generated,
                "n_validation": settings.n_validation, "deep_sad": DeepSADConfig(epochs=own.epochs, seed=settings.seed),
                "device": settings.device, "seed": settings.seed, "progress": settings.progress}

    def generate(self, n: int, seed: int) -> np.ndarray:
        return self.adapter.generate(n, seed=seed)

    def feature_means(self, samples: dict[str, np.ndarray], stages: Stages = INLINE) -> dict[str, np.ndarray]:
        """Mean recovered activation per sample set (FLIPAD features only)."""
        self._check_fitted()
        if self.feature_config.kind != "flipad":
            return {}
        return {name: stages.run(self.extractor_, x, name).features.mean(0).numpy() for name, x in samples.items()}

    @property
    def module(self) -> nn.Module:
        return self.adapter.module

    # -- fitting ----------------------------------------------------------------------------

    @property
    def feature_config(self) -> FeatureConfig:
        return self.features if isinstance(self.features, FeatureConfig) else FeatureConfig(kind=self.features)

    def fit(
        self,
        generated: np.ndarray | None = None,
        real: np.ndarray | None = None,
        negatives: Sequence[np.ndarray] | np.ndarray | None = None,
        validation: np.ndarray | None = None,
        stages: Stages = INLINE,
    ) -> FlipadDetector:
        """Train on the generator's samples (``generated``; drawn from the adapter when None)
        against ``real`` data and other ``negatives``; set thresholds on ``validation`` samples of
        the generator (drawn fresh when None). The inversions run through ``stages``. Returns self."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        seeds = Seeds(self.seed)
        if generated is None:
            generated = self.adapter.generate(self.n_generated, seed=seeds.train)
        if validation is None:
            validation = self.adapter.generate(self.n_validation, seed=seeds.validation)
        others = stack_negatives(real, negatives)
        timings["sample_s"] = time.perf_counter() - start

        extractor = FeatureExtractor(self.adapter, self.feature_config)
        start = time.perf_counter()
        f_gen = stages.run(extractor, generated, "generated (train)")
        f_other = stages.run(extractor, others, "negatives (train)")
        f_val = stages.run(extractor, validation, "generated (validation)")
        timings["features_s"] = time.perf_counter() - start
        summary = f_gen.summary() if self.feature_config.kind == "flipad" else None
        self.fit_features(f_gen.features, f_other.features, f_val.features, summary)
        self.fit_info_["timings"] = {**timings, **self.fit_info_["timings"]}
        return self

    def fit_features(
        self,
        generated: torch.Tensor,
        negatives: torch.Tensor,
        validation: torch.Tensor,
        inversion_summary: dict | None = None,
    ) -> FlipadDetector:
        """Fit from unscaled features already computed with ``FeatureExtractor(adapter, feature_config)``
        (what :meth:`fit` does after extracting them; lets a pipeline cache the inversion). Returns self."""
        if generated.shape[1:] != negatives.shape[1:] or generated.shape[1:] != validation.shape[1:]:
            raise ValueError(
                f"feature shapes differ: generated {tuple(generated.shape[1:])}, negatives "
                f"{tuple(negatives.shape[1:])}, validation {tuple(validation.shape[1:])}"
            )
        self.extractor_ = FeatureExtractor(self.adapter, self.feature_config)
        self.scaler_ = FeatureScaler(self.feature_config.scale_eps).fit(generated)
        x = torch.cat([self.scaler_(generated), self.scaler_(negatives)])
        labels = torch.cat([torch.full((len(generated),), NORMAL), torch.full((len(negatives),), ANOMALY)])
        self.trainer_ = DeepSADTrainer(self.deep_sad or DeepSADConfig(seed=self.seed), resolve_device(self.device))
        start = time.perf_counter()
        self.network_, self.center_ = self.trainer_.fit(x, labels, progress=self.progress)
        deep_sad_s = time.perf_counter() - start
        self._calibrate(self.trainer_.distances(self.network_, self.center_, self.scaler_(validation)))
        self.fit_info_ = {
            "n_generated": len(generated),
            "n_negatives": len(negatives),
            "n_validation": len(validation),
            "timings": {"deep_sad_s": deep_sad_s},
            "inversion": inversion_summary,
        }
        return self

    # -- inference --------------------------------------------------------------------------

    def score(self, samples: np.ndarray | torch.Tensor, stages: Stages = INLINE, exhaustive: bool = False) -> Scores:
        """Scores (higher = more typical) with the inversion's residual and sparsity per item."""
        return self._verdict_scores(*self._anomaly_and_diagnostics(samples, stages))

    def _anomaly_and_diagnostics(self, samples: np.ndarray | torch.Tensor,
                                 stages: Stages) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        """Deep SAD distances (private: small = typical) and the inversion's diagnostics."""
        self._check_fitted()
        fs = stages.run(self.extractor_, samples, "score")
        return self._distances(fs.features), {"residual": fs.residual, "sparsity": fs.sparsity}

    def fit_summary(self) -> dict[str, float]:
        # the features' iteration cap is a deliberate budget (FeatureConfig.inversion), so what is
        # logged is how close the budget gets: the certified gap and the residual, not "converged"
        inversion = self.fit_info_.get("inversion") or {}
        out = {f"inversion_{k}": float(v) for k, v in inversion.items() if k in ("gap_median", "residual_median")}
        if inversion:
            out["inversion_iteration_budget"] = float(self.feature_config.inversion.max_iter)
        return out

    def generator_info(self) -> dict[str, Any]:
        return {"latent_shape": list(self.adapter.latent_shape), "final_layer": self.adapter.final_layer_name,
                "activation": self.adapter.activation.name}

    def transform(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Scaled features of ``samples`` (what Deep SAD sees)."""
        return self.scaler_(self.extractor(samples))

    def _anomaly(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Deep SAD distances ``||phi(x) - c||^2``: small = typical of this generator."""
        return self._distances(self.extractor(samples))

    def extractor(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Unscaled features of ``samples`` (the inversion, for the ``flipad`` kind)."""
        self._check_fitted()
        return self.extractor_(samples, progress=self.progress)

    def score_features(self, features: torch.Tensor) -> np.ndarray:
        """Scores (higher = more typical) from unscaled features computed by :meth:`extractor`."""
        return self._to_score(self._distances(features))

    def _distances(self, features: torch.Tensor) -> torch.Tensor:
        """Deep SAD distances ``||phi(x) - c||^2`` (small = typical) from unscaled features."""
        self._check_fitted()
        return self.trainer_.distances(self.network_, self.center_, self.scaler_(features))

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The shape of one sample of the generator."""
        return tuple(self.adapter.output_shape)

    @property
    def sample_range(self) -> tuple[float, float]:
        return (self.adapter.activation.low, self.adapter.activation.high)

    # -- persistence ------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write ``config.json`` and ``tensors.safetensors`` into the folder ``path`` (no pickles)."""
        self._check_fitted()
        config = {
            "generator_sha256": self.adapter.fingerprint,
            "latent_shape": list(self.adapter.latent_shape),
            "final_layer": self.adapter.final_layer_name,
            "activation": self.adapter.activation.name,
            "output_shape": list(self.adapter.output_shape),
            "features": self.feature_config.to_dict(),
            "feature_shape": list(self.scaler_.mean_.shape),
            "fnr": list(self.fnr),
            "thresholds": {str(k): v for k, v in self.thresholds_.items()},
            "deep_sad": asdict(self.trainer_.config),
            "seed": self.seed,
            "fit_info": self.fit_info_,
        }
        tensors = {f"network.{k}": v.detach().cpu().contiguous() for k, v in self.network_.state_dict().items()}
        tensors.update(
            center=self.center_.detach().cpu(),
            scaler_mean=self.scaler_.mean_.cpu(),
            scaler_std=self.scaler_.std_.cpu(),
            validation_scores=self.validation_scores_.cpu(),
            anchor=self.extractor_.inversion_adapter.anchor.cpu(),
        )
        return write_saved(path, "flipad", config, tensors)

    @classmethod
    def load(cls, path: str | Path, module: nn.Module | GeneratorAdapter, device: str = "auto",
             latent_shape: Sequence[int] | None = None) -> FlipadDetector:
        """Load a detector saved by :meth:`save` for the same generator (checked by weight hash);
        ``module`` is the generator or an adapter of it (``latent_shape`` for detectors saved
        before it was recorded, when the module has no ``latent_shape`` attribute)."""
        config, tensors = read_saved(path, "flipad")
        adapter = module if isinstance(module, GeneratorAdapter) else GeneratorAdapter.from_module(
            module, latent_shape or config.get("latent_shape"), final_layer=config["final_layer"],
            activation=config["activation"], device=device, seed=config["seed"])
        check_generator(path, config["generator_sha256"], adapter.fingerprint)
        deep_sad = DeepSADConfig(**{**config["deep_sad"], "lr_milestones": tuple(config["deep_sad"]["lr_milestones"])})
        det = cls(adapter, FeatureConfig.from_dict(config["features"]), config["fnr"], deep_sad=deep_sad,
                  device=device, seed=config["seed"], progress=False)
        dev = resolve_device(device)
        det.extractor_ = FeatureExtractor(adapter, det.feature_config)
        det.extractor_.inversion_adapter.set_anchor(tensors["anchor"])
        det.scaler_ = FeatureScaler(det.feature_config.scale_eps)
        det.scaler_.mean_, det.scaler_.std_ = tensors["scaler_mean"], tensors["scaler_std"]
        det.trainer_ = DeepSADTrainer(deep_sad, dev)
        det.network_ = build_encoder(config["feature_shape"], deep_sad.rep_dim).to(dev)
        det.network_.load_state_dict({k[len("network."):]: v for k, v in tensors.items() if k.startswith("network.")})
        det.network_.eval()
        det.center_ = tensors["center"].to(dev)
        det._calibrate(tensors["validation_scores"])
        det.fit_info_ = config["fit_info"]
        return det
