"""``AttributionDetector``: one verdict from both alteration-free families.

FLIPAD (final-layer inversion + Deep SAD) is fast; the reconstruction-loss search is slow but
needs no final-layer structure and separates look-alike generators. Each family's anomaly score
is put on a common scale against a first held-out set of the generator's samples, aligned at the
operating point: ``(log a - log q) / (log q - log m)`` with ``q`` the family's own threshold at
the first FNR target (its ``1 - fnr`` quantile) and ``m`` its median, so 0 means "at this
family's own threshold" in both. The combined score is the larger of the two: an item is
attributed only if both families find it typical. (A median/MAD scale, measured first, let the
family with the heavier own-sample tail set the joint threshold alone: look-alike generators
rejected by the reconstruction family at 0.92-0.96 balanced accuracy were then accepted at
0.67-0.75. Empirical p-values floor at ``1 / (n + 1)`` and tie beyond the held-out range.)
The thresholds of that combined score are then set on a *second* held-out set, so the stated
FNR holds for the verdict as a whole. Generators FLIPAD refuses (skip connections into the
output, non-invertible activations) use the reconstruction family alone.

At inference the reconstruction search runs only where it can change the answer: an item whose
FLIPAD p-value is already below every threshold is rejected without it (its combined score is
then reported as its FLIPAD score, a lower bound that keeps the same verdict).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..generators.tracing import NotInvertibleError
from .base import (
    INLINE,
    Detector,
    DetectorSettings,
    Scores,
    Seeds,
    Stages,
    register_kind,
)
from .calibration import CalibratedDetector, check_fnr
from .flipad import FlipadDetector
from .persist import read_saved, write_saved
from .reconstruction import ReconstructionConfig, ReconstructionLossDetector

__all__ = ["AttributionDetector"]

logger = logging.getLogger(__name__)


@register_kind
class AttributionDetector(Detector):
    """The product's verdict: FLIPAD and reconstruction loss, calibrated together.

    ``flipad_options`` are keyword arguments of :class:`FlipadDetector` (features, deep_sad,
    n_generated); ``reconstruction`` configures the latent search. ``n_validation`` samples
    serve as the p-value reference of both families, ``n_calibration`` further samples set the
    combined thresholds.
    """

    kind = "attribution"
    description = "FLIPAD and reconstruction loss, both must accept (takes the flipad.* and reconstruction.* settings)"
    diagnostics = {**FlipadDetector.diagnostics, **ReconstructionLossDetector.diagnostics}

    def __init__(
        self,
        module: nn.Module,
        latent_shape: Sequence[int] | None = None,
        fnr: Sequence[float] = (0.005,),
        n_validation: int = 1000,
        n_calibration: int = 1000,
        flipad_options: dict | None = None,
        reconstruction: ReconstructionConfig | None = None,
        device: str = "auto",
        seed: int = 0,
        progress: bool = True,
    ):
        self._module = module
        self.latent_shape = latent_shape
        self.fnr = check_fnr(fnr)
        self.n_validation = n_validation
        self.n_calibration = n_calibration
        self.flipad_options = flipad_options
        self.reconstruction = reconstruction
        self.device = device
        self.seed = seed
        self.progress = progress

    @property
    def module(self) -> nn.Module:
        return self._module

    @classmethod
    def from_settings(cls, module: nn.Module, latent_shape: Sequence[int] | None,
                      settings: DetectorSettings) -> AttributionDetector:
        flipad_options = {k: v for k, v in FlipadDetector.options(settings).items()
                          if k in ("features", "n_generated", "deep_sad")}
        reconstruction = settings.of(ReconstructionLossDetector).config(settings.seed)
        return cls(module, latent_shape, fnr=settings.fnr, n_validation=settings.n_validation,
                   n_calibration=settings.n_calibration, flipad_options=flipad_options, reconstruction=reconstruction,
                   device=settings.device, seed=settings.seed, progress=settings.progress)

    def generate(self, n: int, seed: int) -> np.ndarray:
        if not hasattr(self, "reconstruction_"):
            self.reconstruction_ = self._new_reconstruction()
        return self.reconstruction_.generate(n, seed)

    def _new_reconstruction(self) -> ReconstructionLossDetector:
        return ReconstructionLossDetector(
            self._module, self.latent_shape, fnr=self.fnr, n_validation=self.n_validation,
            config=self.reconstruction, device=self.device, progress=self.progress, seed=self.seed,
        )

    def feature_means(self, samples: dict[str, np.ndarray], stages: Stages = INLINE) -> dict[str, np.ndarray]:
        return {} if self.flipad_ is None else self.flipad_.feature_means(samples, stages)

    def latent_search(self):
        self._check_fitted()
        return self.reconstruction_.latent_search()

    def fit(
        self,
        generated: np.ndarray | None = None,
        real: np.ndarray | None = None,
        negatives: Sequence[np.ndarray] | np.ndarray | None = None,
        validation: np.ndarray | None = None,
        stages: Stages = INLINE,
    ) -> AttributionDetector:
        """Fit FLIPAD (if the generator allows it) and the reconstruction family on the same
        ``validation`` samples, then set the verdict's joint thresholds on further calibration
        samples of the generator. Returns self."""
        seeds = Seeds(self.seed)
        self.reconstruction_ = self._new_reconstruction()
        if validation is None:
            validation = self.reconstruction_.generate(self.n_validation, seed=seeds.validation)
        self.flipad_, self.flipad_refusal_ = None, None
        timings: dict[str, float] = {}
        start = time.perf_counter()
        try:
            options = {"fnr": self.fnr, "device": self.device, "seed": self.seed, "progress": self.progress,
                       **(self.flipad_options or {})}
            flipad = FlipadDetector.from_module(self._module, self.latent_shape, **options)
        except NotInvertibleError as exc:
            self.flipad_refusal_ = str(exc)
            logger.warning("FLIPAD cannot invert this generator (%s); using reconstruction loss alone", exc)
        else:
            self.flipad_ = flipad.fit(generated, real, negatives, validation, stages=stages)
        timings["time_flipad_fit_s"] = time.perf_counter() - start
        start = time.perf_counter()
        self.reconstruction_.fit(validation=validation, stages=stages)
        timings["time_reconstruction_fit_s"] = time.perf_counter() - start
        start = time.perf_counter()
        self.scales_ = {"reconstruction": self._standardiser(self.reconstruction_.validation_scores_)}
        if self.flipad_ is not None:
            self.scales_["flipad"] = self._standardiser(self.flipad_.validation_scores_)
        calibration = self.reconstruction_.generate(self.n_calibration, seed=seeds.calibration)
        self._calibrate(self._combined(calibration, stages, exhaustive=True)[0])
        timings["time_combined_calibration_s"] = time.perf_counter() - start
        self.fit_info_ = {
            "timings": timings,
            "families": list(self.parts()),
            "flipad_refusal": self.flipad_refusal_,
            "n_validation": len(validation),
            "n_calibration": len(calibration),
        }
        return self

    def parts(self) -> dict[str, CalibratedDetector]:
        parts: dict[str, CalibratedDetector] = {}
        if self.flipad_ is not None:
            parts["flipad"] = self.flipad_
        parts["reconstruction"] = self.reconstruction_
        return parts

    def family_scores(self, samples: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """Each family's own scores and the exact combined score (the latent search on every item)."""
        self._check_fitted()
        combined, families, _ = self._combined(samples, INLINE, exhaustive=True)
        return {**families, "combined": self._to_score(combined)}

    def _standardiser(self, validation_scores: torch.Tensor) -> tuple[float, float]:
        """(centre, scale) of a family's log anomaly scores: its own threshold at the first FNR, and
        the distance from its median to that threshold."""
        logs = validation_scores.double().clamp_min(1e-30).log()
        threshold = float(torch.quantile(logs, 1 - self.fnr[0]))
        return threshold, max(threshold - float(logs.median()), 1e-12)

    def _standardise(self, family: str, scores: torch.Tensor) -> torch.Tensor:
        centre, scale = self.scales_[family]
        return (scores.double().clamp_min(1e-30).log() - centre) / scale

    def _combined(self, samples: np.ndarray | torch.Tensor, stages: Stages, exhaustive: bool,
                  ) -> tuple[torch.Tensor, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The combined anomaly score, each family's score (higher = more typical; NaN where the
        search was skipped) and the diagnostics."""
        recon = self.reconstruction_
        if self.flipad_ is None:
            self.last_searched_fraction_ = 1.0
            loss = stages.run(recon.search_, samples, "score")
            return self._standardise("reconstruction", loss), {"reconstruction": recon._to_score(loss)}, {
                "latent_loss": loss.double().numpy()}
        flipad_anomaly, flipad_diagnostics = self.flipad_._anomaly_and_diagnostics(samples, stages)
        combined = self._standardise("flipad", flipad_anomaly)
        # items FLIPAD already rejects at every threshold keep its score: the search cannot change them
        need = torch.ones_like(combined, dtype=torch.bool)
        if not exhaustive:
            need = combined <= max(self.thresholds_.values())
        loss = torch.full((len(combined),), float("nan"), dtype=torch.float64)
        if need.any():
            subset = samples[need.numpy()] if isinstance(samples, np.ndarray) else samples[need]
            loss[need] = stages.run(recon.search_, subset, "score").double()
            combined[need] = torch.maximum(combined[need], self._standardise("reconstruction", loss[need]))
        self.last_searched_fraction_ = float(need.double().mean())
        families = {"flipad": self.flipad_._to_score(flipad_anomaly), "reconstruction": recon._to_score(loss)}
        return combined, families, {**flipad_diagnostics, "latent_loss": loss.numpy()}

    def _anomaly(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The larger of the two families' standardised log anomaly scores (higher = less like the generator)."""
        self._check_fitted()
        return self._combined(samples, INLINE, exhaustive=False)[0]

    def score(self, samples: np.ndarray | torch.Tensor, stages: Stages = INLINE, exhaustive: bool = False) -> Scores:
        """The verdict; ``exhaustive`` runs the latent search on every item (evaluation), else only
        where it can change the answer."""
        self._check_fitted()
        combined, families, diagnostics = self._combined(samples, stages, exhaustive)
        return Scores(self._to_score(combined), self.thresholds, families,
                      {name: part.thresholds for name, part in self.parts().items()}, diagnostics)

    def fit_summary(self) -> dict[str, float]:
        out: dict[str, float] = dict(self.fit_info_.get("timings", {}))
        for part in self.parts().values():
            out.update(part.fit_summary())
        return out

    def generator_info(self) -> dict[str, Any]:
        return self.reconstruction_.generator_info()

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The shape of one sample of the generator."""
        return self.reconstruction_.output_shape

    @property
    def sample_range(self) -> tuple[float, float]:
        return self.reconstruction_.sample_range

    def save(self, path: str | Path) -> Path:
        """Write both families (``flipad/`` when fitted, ``reconstruction/``) and the joint calibration into ``path``."""
        self._check_fitted()
        folder = Path(path)
        if self.flipad_ is not None:
            self.flipad_.save(folder / "flipad")
        self.reconstruction_.save(folder / "reconstruction")
        config = {"fnr": list(self.fnr), "n_validation": self.n_validation, "n_calibration": self.n_calibration,
                  "seed": self.seed, "scales": {k: list(v) for k, v in self.scales_.items()},
                  "flipad_refusal": self.flipad_refusal_, "fit_info": self.fit_info_}
        return write_saved(folder, "attribution", config, {"validation_scores": self.validation_scores_})

    @classmethod
    def load(cls, path: str | Path, module: nn.Module, device: str = "auto",
             latent_shape: Sequence[int] | None = None) -> AttributionDetector:
        """Load a detector saved by :meth:`save` for the same generator (checked by weight hash)."""
        folder = Path(path)
        config, tensors = read_saved(folder, "attribution")
        reconstruction = ReconstructionLossDetector.load(folder / "reconstruction", module, device)
        det = cls(module, reconstruction.latent_shape_, config["fnr"], config["n_validation"], config["n_calibration"],
                  reconstruction=reconstruction.config, device=device, seed=config["seed"], progress=False)
        det.reconstruction_, det.flipad_, det.flipad_refusal_ = reconstruction, None, config["flipad_refusal"]
        if (folder / "flipad").is_dir():
            det.flipad_ = FlipadDetector.load(folder / "flipad", module, device, latent_shape=reconstruction.latent_shape_)
        det.scales_ = {k: (float(v[0]), float(v[1])) for k, v in config["scales"].items()}
        det._calibrate(tensors["validation_scores"])
        det.fit_info_ = config["fit_info"]
        return det
