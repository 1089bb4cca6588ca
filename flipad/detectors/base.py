"""The one detector contract every family and the verdict implement, and the registry of kinds.

A detector is built from the generator module (and its latent shape), ``fit`` runs every stage
its family needs, ``score`` returns one :class:`Scores` object in one sign convention (higher =
more typical of the generator; attributed when ``score >= threshold``), and ``save(path)`` /
``load(path, module)`` persist it as JSON + safetensors. Bundles, flows and the CLI look a kind
up in :data:`DETECTOR_KINDS` by name and never branch on a class.

A family's expensive stages (the final-layer inversion, the latent search) are :class:`Stage`
objects (a name, a fingerprint, a device and ``run``), run through a :class:`Stages` object
handed to ``fit`` and ``score``: the default runs them in-process; the onboarding flow passes one
that wraps every stage as one cached, device-tagged Prefect task.

A kind's settings, diagnostics and secret are declared on its class and registered with
:func:`~flipad.kinds.register_kind` (see :mod:`flipad.kinds`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from ..generators.challengers import build_challengers
from ..generators.sampling import generate_samples
from ..kinds import DETECTOR_ALIASES, DETECTOR_KINDS, detector_class, register_kind
from .calibration import CalibratedDetector

__all__ = ["Detector", "DetectorSettings", "DETECTOR_ALIASES", "DETECTOR_KINDS", "NoSettings", "Scores", "Seeds", "Stage",
           "Stages", "detector_class", "register_kind", "sha256_array"]


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
    items, where that differs; the monitoring reference is built from it. ``resaved_thresholds``:
    for items scored as lossless (:meth:`Detector.score_lossless`) by a family whose ``thresholds``
    are then those of its unaltered own items, the thresholds that also cover its re-saved own
    items; an item between the two is undecided (empty: every item is decided).
    """

    score: np.ndarray
    thresholds: dict[float, float]
    families: dict[str, np.ndarray] = field(default_factory=dict)
    family_thresholds: dict[str, dict[float, float]] = field(default_factory=dict)
    diagnostics: dict[str, np.ndarray] = field(default_factory=dict)
    attributed: Scores | None = None
    resaved_thresholds: dict[float, float] = field(default_factory=dict)

    @property
    def threshold(self) -> float:
        """The decision threshold at the first FNR target."""
        return next(iter(self.thresholds.values()))

    def is_generated(self, fnr: float | None = None) -> np.ndarray:
        """Bool per item: attributed to the generator at the threshold for ``fnr`` (default the first)."""
        threshold = self.threshold if fnr is None else self.thresholds[fnr]
        return self.score >= threshold

    def is_undecided(self, fnr: float | None = None) -> np.ndarray:
        """Bool per item: below the threshold for ``fnr`` (default the first) but within what the
        generator's re-saved items reach (``resaved_thresholds``); all False when there are none."""
        fnr = next(iter(self.thresholds)) if fnr is None else fnr
        if not self.resaved_thresholds:
            return np.zeros(len(self.score), dtype=bool)
        return (self.score >= self.resaved_thresholds[fnr]) & ~self.is_generated(fnr)

    def __len__(self) -> int:
        return len(self.score)


class Stage(Protocol):
    """An expensive stage of a family: ``run(samples)`` depends only on the samples and on what
    ``fingerprint()`` hashes (weights, configuration), so its result can be cached by content;
    ``name`` names its task and ``device`` ("cpu", "cuda") where it runs."""

    name: str

    @property
    def device(self) -> str: ...

    def fingerprint(self) -> str: ...

    def run(self, samples: np.ndarray | torch.Tensor) -> Any: ...


class Stages:
    """Runs a detector's expensive stages; the default computes them here and now.

    A pipeline subclasses it to cache the results by content hash or to run them on another
    machine; ``label`` names the sample set (for logs and task names).
    """

    def run(self, stage: Stage, samples: np.ndarray | torch.Tensor, label: str) -> Any:
        """``stage.run(samples)``, here and now."""
        return stage.run(samples)


INLINE = Stages()
# what content streams do to images: re-saved as JPEG at the qualities sites use (a PNG of a JPEG
# has the JPEG's pixels); see docs/benchmarks.md for what each does to the verdict
ROBUST_PERTURBATIONS = ("jpeg q95", "jpeg q90", "jpeg q80", "jpeg q70")


@dataclass(frozen=True)
class DetectorSettings:
    """What every kind is built from (:meth:`Detector.from_settings`). ``fnr``: tolerable
    false-negative rates (the first is the decision threshold); ``n_generated``/``n_validation``/
    ``n_calibration``: generator samples drawn for training, the families' thresholds and the
    verdict's joint thresholds. ``families``: each kind's own settings by kind (its ``Settings``
    dataclass; :func:`~flipad.kinds.family_settings` builds them from ``--set`` values); a kind
    not named there uses its defaults."""

    fnr: tuple[float, ...] = (0.005,)
    n_generated: int = 2000
    n_validation: int = 1000
    n_calibration: int = 1000
    device: str = "auto"
    seed: int = 0
    progress: bool = True
    families: dict[str, Any] = field(default_factory=dict)

    def of(self, cls: type[Detector]) -> Any:
        """The settings of the kind ``cls`` (its defaults unless given)."""
        return self.families.get(cls.kind) or cls.Settings()

    def as_params(self) -> dict[str, Any]:
        """Flat ``name: value`` pairs to log (``families`` as ``KIND.KEY``), without ``progress``."""
        common = {f: getattr(self, f) for f in ("fnr", "n_generated", "n_validation", "n_calibration", "device", "seed")}
        return {**common, **{f"{kind}.{k}": v for kind, values in self.families.items()
                             for k, v in asdict(values).items()}}


@dataclass(frozen=True)
class NoSettings:
    """The settings of a kind that has none of its own."""


D = TypeVar("D", bound="Detector")


class Detector(CalibratedDetector):
    """The contract: ``from_module``, ``fit``, ``score``, ``save``/``load`` and the generator it wraps.

    Subclasses set ``kind`` (their name in :data:`DETECTOR_KINDS`), ``description``, ``Settings``
    (a dataclass of their options), ``diagnostics`` (per-item figures, name -> meaning) and
    ``secret``, and register with :func:`register_kind`. They implement ``_anomaly`` (private:
    small = typical); everything public is in the score space (higher = more typical).
    """

    kind: ClassVar[str]
    description: ClassVar[str]
    Settings: ClassVar[type] = NoSettings
    diagnostics: ClassVar[dict[str, str]] = {}
    secret: ClassVar[str | None] = None

    @classmethod
    def from_settings(cls: type[D], module: nn.Module, latent_shape: Sequence[int] | None, settings: DetectorSettings) -> D:
        """An unfitted detector of this kind for the generator ``module``."""
        raise NotImplementedError

    def generate(self, n: int, seed: int) -> np.ndarray:
        """``n`` samples of the generator (8-bit for images) from the latents drawn for ``seed``."""
        raise NotImplementedError

    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one of the generator's items, before ``fit`` (what data is loaded for)."""
        return tuple(self.generate(1, seed=0).shape[1:])

    def own_samples(self, n: int, seed: int, real: np.ndarray | None = None) -> np.ndarray:
        """``n`` of the generator's own items for ``seed``: its samples (:meth:`generate`); a family
        whose generator makes items from real ones (an autoencoder's decoder) makes them from ``real``."""
        return self.generate(n, seed)

    def lookalikes(self, real: np.ndarray, seeds: Seeds, steps: int, n: int) -> dict[str, np.ndarray]:
        """``n`` items of each look-alike an owner meets, built from the generator and the ``real``
        data alone (name -> items): for a latent generator, the same architecture retrained from
        another seed and the generator fine-tuned, each ``steps`` GAN steps, and a weight-perturbed
        copy (:func:`~flipad.generators.challengers.build_challengers`)."""
        latent_shape = self.generator_info()["latent_shape"]
        built = build_challengers(self.module, latent_shape, real, self.sample_range, seeds.challengers, train_steps=steps)
        return {f"lookalike_{kind}": generate_samples(module, latent_shape, n, seeds.test, self.sample_range)
                for kind, module in built.items()}

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

    def score_lossless(self, samples: np.ndarray | torch.Tensor, stages: Stages = INLINE,
                       exhaustive: bool = False) -> Scores:
        """:meth:`score` for items known to carry no lossy history: made in memory, or read from a
        lossless file whose pixels show no trace of a JPEG. A family whose thresholds also cover
        re-saved own items, and that knows its unaltered own items' scores exactly, judges these
        against the thresholds of the unaltered ones (``Scores.thresholds``) and names the others
        in ``Scores.resaved_thresholds``: an item between the two could be an own item re-saved
        without a trace, or another source, and is undecided. By default, :meth:`score`."""
        return self.score(samples, stages, exhaustive)

    def use_secret(self, secret: bytes) -> None:
        """Hand the detector the owner's master secret (kinds whose ``secret`` says what they need it
        for). Whoever builds or loads the detector calls it; the secret never enters the settings,
        the bundle or a log, so a kind derives what it needs (an HKDF key) and keeps it in memory."""
        raise TypeError(f"the {self.kind} detector takes no secret")

    def latent_search(self) -> Stage | None:
        """The fitted latent search with its encoder (a
        :class:`~flipad.detectors.reconstruction.LatentSearch`), which reading keys inverts with
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
        """A single family's :class:`Scores` from its private anomaly scores."""
        score = self._to_score(anomaly)
        return Scores(score, self.thresholds, {self.kind: score}, {self.kind: self.thresholds}, diagnostics or {})
