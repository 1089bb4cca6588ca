"""The one detector contract every family and the verdict implement, and the registry of kinds.

A detector is built from the generator module (and its latent shape), ``fit`` runs every stage
its family needs, ``score`` returns one :class:`Scores` object in one sign convention (higher =
more typical of the generator; attributed when ``score >= threshold``), and ``save(path)`` /
``load(path, module)`` persist it as JSON + safetensors. Bundles, flows and the CLI look a kind
up in :data:`DETECTOR_KINDS` by name and never branch on a class.

Stages that a pipeline must cache or send to a GPU (the final-layer inversion, the latent
search) run through a :class:`Stages` object handed to ``fit`` and ``score``: the default runs
them in-process; the onboarding flow passes one that wraps them as cached Prefect tasks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import nn

from ..inversion.latent import ReconstructionConfig
from .calibration import CalibratedDetector
from .deepsad import DeepSADConfig
from .features import FeatureConfig

if TYPE_CHECKING:
    from .features import FeatureExtractor, FeatureSet
    from .reconstruction import LatentSearch

__all__ = ["Detector", "DetectorSettings", "DETECTOR_ALIASES", "DETECTOR_KINDS", "Scores", "Seeds", "Stages", "detector_class",
           "register_kind", "sha256_array"]


def sha256_array(array: np.ndarray) -> str:
    """Content hash of an array (shape, dtype and bytes): the cache key of data, never its path."""
    digest = hashlib.sha256(str((array.shape, array.dtype.str)).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Seeds:
    """Seeds of every draw from the generator, from one base seed: training, validation (the
    families' thresholds), calibration (the verdict's joint thresholds) and held-out test samples
    never overlap."""

    base: int = 0

    @property
    def train(self) -> int:
        return 1000 + self.base

    @property
    def validation(self) -> int:
        return 2000 + self.base

    @property
    def test(self) -> int:
        return 3000 + self.base

    @property
    def calibration(self) -> int:
        return 4000 + self.base

    @property
    def challengers(self) -> int:
        """Seeds of the look-alike challengers onboarding builds (their weights and their draws)."""
        return 5000 + self.base


@dataclass(frozen=True)
class Scores:
    """What a detector says about a batch of samples, in one sign convention.

    ``score``: the verdict's score per item, higher = more typical of the generator; an item is
    attributed when ``score >= threshold`` (the threshold at the first FNR target; ``thresholds``
    has one per target). ``families``: each family's own score in the same convention with its
    own thresholds in ``family_thresholds`` (for a single family, the same as the verdict).
    ``diagnostics``: per-item figures of the stages (inversion residual and sparsity, latent-search
    loss), NaN where they do not apply. ``attributed``: for exhaustive scores, what the default
    scoring (which stops each item's search once its verdict is settled) reports for the same
    items, where that differs; the monitoring reference is built from it.
    """

    score: np.ndarray
    thresholds: dict[float, float]
    families: dict[str, np.ndarray] = field(default_factory=dict)
    family_thresholds: dict[str, dict[float, float]] = field(default_factory=dict)
    diagnostics: dict[str, np.ndarray] = field(default_factory=dict)
    attributed: Scores | None = None

    @property
    def threshold(self) -> float:
        """The decision threshold at the first FNR target."""
        return next(iter(self.thresholds.values()))

    def is_generated(self, fnr: float | None = None) -> np.ndarray:
        """Bool per item: attributed to the generator at the threshold for ``fnr`` (default the first)."""
        threshold = self.threshold if fnr is None else self.thresholds[fnr]
        return self.score >= threshold

    def __len__(self) -> int:
        return len(self.score)


class Stages:
    """Runs a detector's expensive stages; the default computes them here and now.

    A pipeline subclasses it to cache the results by content hash or to run them on another
    machine; ``label`` names the sample set (for logs and task names).
    """

    def features(self, extractor: FeatureExtractor, samples: np.ndarray, label: str) -> FeatureSet:
        """Features (and inversion diagnostics) of ``samples``."""
        return extractor.compute(samples)

    def search(self, search: LatentSearch, samples: np.ndarray, label: str) -> torch.Tensor:
        """Best reconstruction loss per item of the full-generator latent search."""
        return search.losses(samples)

    def trajectories(self, search: LatentSearch, samples: np.ndarray, label: str) -> torch.Tensor:
        """Per item, the loss after each stage of the latent search (the last column is the result)."""
        return search.trajectories(samples)


INLINE = Stages()
# what content streams do to images: re-saved as JPEG at the qualities sites use (a PNG of a JPEG
# has the JPEG's pixels); see docs/benchmarks.md for what each does to the verdict
ROBUST_PERTURBATIONS = ("jpeg q95", "jpeg q90", "jpeg q80", "jpeg q70")


@dataclass(frozen=True)
class DetectorSettings:
    """What every kind is built from (:meth:`Detector.from_settings`); each uses the settings that
    apply to its families. ``fnr``: tolerable false-negative rates (the first is the decision
    threshold); ``n_generated``/``n_validation``/``n_calibration``: generator samples drawn for
    training, the families' thresholds and the verdict's joint thresholds. ``perturbations``: what
    the reconstruction family's thresholds are also calibrated on (the first ``n_perturbed``
    validation samples after each; all when None), so the stated FNR holds for recompressed
    copies."""

    fnr: tuple[float, ...] = (0.005,)
    n_generated: int = 2000
    n_validation: int = 1000
    n_calibration: int = 1000
    features: FeatureConfig = field(default_factory=FeatureConfig)
    deep_sad: DeepSADConfig = field(default_factory=DeepSADConfig)
    search: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    perturbations: tuple[str, ...] = ROBUST_PERTURBATIONS
    n_perturbed: int | None = None
    device: str = "auto"
    seed: int = 0
    progress: bool = True

D = TypeVar("D", bound="Detector")


class Detector(CalibratedDetector):
    """The contract: ``from_module``, ``fit``, ``score``, ``save``/``load`` and the generator it wraps.

    Subclasses set ``kind`` (their name in :data:`DETECTOR_KINDS`) and ``description`` and
    register with :func:`register_kind`.
    """

    kind: ClassVar[str]
    description: ClassVar[str]

    @classmethod
    def from_settings(cls: type[D], module: nn.Module, latent_shape: Sequence[int] | None, settings: DetectorSettings) -> D:
        """An unfitted detector of this kind for the generator ``module``."""
        raise NotImplementedError

    def generate(self, n: int, seed: int) -> np.ndarray:
        """``n`` samples of the generator (8-bit for images) from the latents drawn for ``seed``."""
        raise NotImplementedError

    def feature_means(self, samples: dict[str, np.ndarray], stages: Stages = INLINE) -> dict[str, np.ndarray]:
        """Per sample set, the mean of the features a family learns from (for plots); empty when
        no family has such features."""
        return {}

    def fit(
        self: D,
        generated: np.ndarray | None = None,
        real: np.ndarray | None = None,
        negatives: Sequence[np.ndarray] | np.ndarray | None = None,
        validation: np.ndarray | None = None,
        stages: Stages = INLINE,
    ) -> D:
        raise NotImplementedError

    def score(self, samples: np.ndarray | torch.Tensor, stages: Stages = INLINE, exhaustive: bool = False) -> Scores:
        """The verdict, every family's score and the stages' diagnostics for ``samples``;
        ``exhaustive`` runs every family on every item (evaluation) where the verdict would stop
        early."""
        raise NotImplementedError

    def anomaly_scores(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The verdict's score negated (small = typical): the space the thresholds are set in."""
        return -torch.as_tensor(self.score(samples).score, dtype=torch.float64)

    def latent_search(self) -> LatentSearch | None:
        """The fitted latent search with its encoder, which reading keys inverts with
        (:mod:`flipad.keys`); None for families without one."""
        return None

    def calibrated_jpeg_quality(self) -> float | None:
        """The lowest JPEG quality the thresholds were calibrated on (JPEG items re-saved below it
        are ``undecided``); None when no JPEG re-save was calibrated and every item is decided."""
        return None

    def parts(self) -> dict[str, CalibratedDetector]:
        """Each family by name, with its own thresholds (a single family: itself)."""
        return {self.kind: self}

    @property
    def module(self) -> nn.Module:
        """The generator module."""
        raise NotImplementedError

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The shape of one sample of the generator."""
        raise NotImplementedError

    @property
    def sample_range(self) -> tuple[float, float]:
        """The range of the generator's samples (uint8 pixels map onto it)."""
        raise NotImplementedError

    def generator_info(self) -> dict[str, Any]:
        """What a bundle records to rebuild the generator for this detector (at least ``latent_shape``)."""
        raise NotImplementedError

    def fit_summary(self) -> dict[str, float]:
        """Numbers about the fit worth logging (sample counts, convergence of the stages)."""
        return {}

    def save(self, path: str | Path) -> Path:
        """Write the fitted detector into the folder ``path`` (JSON + safetensors, no pickles)."""
        raise NotImplementedError

    @classmethod
    def load(cls: type[D], path: str | Path, module: nn.Module, device: str = "auto",
             latent_shape: Sequence[int] | None = None) -> D:
        """The detector saved in ``path`` for the generator ``module`` (checked by weight hash)."""
        raise NotImplementedError

    def _verdict_scores(self, anomaly: torch.Tensor, diagnostics: dict[str, np.ndarray] | None = None) -> Scores:
        """A single family's :class:`Scores` from its anomaly scores (small = typical)."""
        score = -anomaly.double().cpu().numpy()
        thresholds = {f: -t for f, t in self.thresholds_.items()}
        return Scores(score, thresholds, {self.kind: score}, {self.kind: thresholds}, diagnostics or {})


DETECTOR_KINDS: dict[str, type[Detector]] = {}


def register_kind(cls: type[D]) -> type[D]:
    """Class decorator: make ``cls`` available under ``cls.kind`` to bundles, flows and the CLI."""
    if cls.kind in DETECTOR_KINDS and DETECTOR_KINDS[cls.kind] is not cls:
        raise ValueError(f"detector kind {cls.kind!r} is registered twice")
    DETECTOR_KINDS[cls.kind] = cls
    return cls


DETECTOR_ALIASES = {"combined": "attribution"}  # the command line's name for the verdict of both families


def detector_class(kind: str) -> type[Detector]:
    """The detector class registered as ``kind`` (or an alias of it); ValueError naming the known kinds otherwise."""
    kind = DETECTOR_ALIASES.get(kind, kind)
    if kind not in DETECTOR_KINDS:
        raise ValueError(f"unknown detector kind {kind!r}; known kinds: {', '.join(sorted(DETECTOR_KINDS))}")
    return DETECTOR_KINDS[kind]


