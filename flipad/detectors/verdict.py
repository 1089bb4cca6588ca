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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..generators.adapter import GeneratorAdapter
from .calibration import CalibratedDetector, check_fnr
from .flipad import VALIDATION_SEED_OFFSET, FlipadDetector
from .persist import read_saved, write_saved
from .reconstruction import ReconstructionConfig, ReconstructionLossDetector
from ..generators.tracing import NotInvertibleError

__all__ = ["AttributionDetector"]

logger = logging.getLogger(__name__)

CALIBRATION_SEED_OFFSET = 4000


class AttributionDetector(CalibratedDetector):
    """The product's verdict: FLIPAD and reconstruction loss, calibrated together.

    ``flipad_options`` are keyword arguments of :class:`FlipadDetector` (features, deep_sad,
    n_generated); ``reconstruction`` configures the latent search. ``n_validation`` samples
    serve as the p-value reference of both families, ``n_calibration`` further samples set the
    combined thresholds.
    """

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
        self.module = module
        self.latent_shape = latent_shape
        self.fnr = check_fnr(fnr)
        self.n_validation = n_validation
        self.n_calibration = n_calibration
        self.flipad_options = flipad_options
        self.reconstruction = reconstruction
        self.device = device
        self.seed = seed
        self.progress = progress

    def fit(
        self,
        generated: np.ndarray | None = None,
        real: np.ndarray | None = None,
        negatives: Sequence[np.ndarray] | np.ndarray | None = None,
        validation: np.ndarray | None = None,
    ) -> AttributionDetector:
        """Fit FLIPAD (if the generator allows it) and the reconstruction family, then calibrate the verdict."""
        if validation is None:
            validation = self._new_reconstruction().generate(self.n_validation, seed=VALIDATION_SEED_OFFSET + self.seed)
        flipad, refusal = None, None
        try:
            adapter = GeneratorAdapter.from_module(self.module, self.latent_shape, device=self.device, seed=self.seed)
        except NotInvertibleError as exc:
            refusal = str(exc)
            logger.warning("FLIPAD cannot invert this generator (%s); using reconstruction loss alone", exc)
        else:
            options = {"fnr": self.fnr, "device": self.device, "seed": self.seed, "progress": self.progress}
            options.update(self.flipad_options or {})
            flipad = FlipadDetector(adapter, **options).fit(generated, real, negatives, validation)
        return self.fit_families(flipad, validation, flipad_refusal=refusal)

    def _new_reconstruction(self) -> ReconstructionLossDetector:
        search = ReconstructionLossDetector(
            self.module, self.latent_shape, fnr=self.fnr, n_validation=self.n_validation,
            config=self.reconstruction, device=self.device, progress=self.progress,
        )
        search._prepare()
        return search

    def fit_families(
        self,
        flipad: FlipadDetector | None,
        validation: np.ndarray,
        flipad_refusal: str | None = None,
        calibration: np.ndarray | None = None,
        flipad_calibration_scores: torch.Tensor | None = None,
    ) -> AttributionDetector:
        """Complete the verdict around a fitted FLIPAD detector (``None``: reconstruction alone).

        ``validation`` must be the held-out generator samples FLIPAD's thresholds were set on: the
        reconstruction family is calibrated on them too, and both families are standardised
        against them. The joint thresholds are then set on ``calibration`` (further generator
        samples, drawn when not given); ``flipad_calibration_scores`` saves recomputing FLIPAD's
        scores of those. Returns self.
        """
        self.reconstruction_ = self._new_reconstruction()
        self.reconstruction_.fit(validation=validation)
        self.flipad_, self.flipad_refusal_ = flipad, flipad_refusal
        self.scales_ = {"reconstruction": self._standardiser(self.reconstruction_.validation_scores_)}
        if flipad is not None:
            self.scales_["flipad"] = self._standardiser(flipad.validation_scores_)
        if calibration is None:
            calibration = self.reconstruction_.generate(self.n_calibration, seed=CALIBRATION_SEED_OFFSET + self.seed)
        self._calibrate(self._combined(calibration, skip_rejected=False, flipad_scores=flipad_calibration_scores))
        self.fit_info_ = {
            "families": ["flipad", "reconstruction"] if flipad else ["reconstruction"],
            "flipad_refusal": flipad_refusal,
            "n_validation": len(validation),
            "n_calibration": len(calibration),
        }
        return self

    def family_scores(self, samples: np.ndarray | torch.Tensor, flipad_scores: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each family's own anomaly scores and the exact combined score (the latent search on every item).

        For evaluation: :meth:`anomaly_scores` skips the search where it cannot change the verdict.
        """
        self._check_fitted()
        out = {"reconstruction": self.reconstruction_.anomaly_scores(samples)}
        combined = self._standardise("reconstruction", out["reconstruction"])
        if self.flipad_ is not None:
            out["flipad"] = self.flipad_.anomaly_scores(samples) if flipad_scores is None else flipad_scores
            combined = torch.maximum(combined, self._standardise("flipad", out["flipad"]))
        out["combined"] = combined
        return out

    def _standardiser(self, validation_scores: torch.Tensor) -> tuple[float, float]:
        """(centre, scale) of a family's log anomaly scores: its own threshold at the first FNR, and
        the distance from its median to that threshold."""
        logs = validation_scores.double().clamp_min(1e-30).log()
        threshold = float(torch.quantile(logs, 1 - self.fnr[0]))
        return threshold, max(threshold - float(logs.median()), 1e-12)

    def _standardise(self, family: str, scores: torch.Tensor) -> torch.Tensor:
        centre, scale = self.scales_[family]
        return (scores.double().clamp_min(1e-30).log() - centre) / scale

    def _combined(self, samples: np.ndarray | torch.Tensor, skip_rejected: bool,
                  flipad_scores: torch.Tensor | None = None) -> torch.Tensor:
        recon = self.reconstruction_
        if self.flipad_ is None:
            self.last_searched_fraction_ = 1.0
            return self._standardise("reconstruction", recon.anomaly_scores(samples))
        if flipad_scores is None:
            flipad_scores = self.flipad_.anomaly_scores(samples)
        combined = self._standardise("flipad", flipad_scores)
        # items FLIPAD already rejects at every threshold keep its score: the search cannot change them
        need = torch.ones_like(combined, dtype=torch.bool)
        if skip_rejected:
            need = combined <= max(self.thresholds_.values())
        if need.any():
            subset = samples[need.numpy()] if isinstance(samples, np.ndarray) else samples[need]
            combined[need] = torch.maximum(combined[need], self._standardise("reconstruction", recon.anomaly_scores(subset)))
        self.last_searched_fraction_ = float(need.double().mean())
        return combined

    def anomaly_scores(self, samples: np.ndarray | torch.Tensor, flipad_scores: torch.Tensor | None = None) -> torch.Tensor:
        """The larger of the two families' standardised log anomaly scores (higher = less like the generator).

        ``flipad_scores``: FLIPAD's anomaly scores of the same samples when the caller already has
        them (computed from its own features), so they are not computed twice.
        """
        self._check_fitted()
        return self._combined(samples, skip_rejected=True, flipad_scores=flipad_scores)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The shape of one sample of the generator."""
        return self.reconstruction_.output_shape

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
    def load(cls, path: str | Path, module: nn.Module, device: str = "auto") -> AttributionDetector:
        """Load a detector saved by :meth:`save` for the same generator (checked by weight hash)."""
        folder = Path(path)
        config, tensors = read_saved(folder, "attribution")
        reconstruction = ReconstructionLossDetector.load(folder / "reconstruction", module, device)
        det = cls(module, reconstruction.latent_shape_, config["fnr"], config["n_validation"], config["n_calibration"],
                  reconstruction=reconstruction.config, device=device, seed=config["seed"], progress=False)
        det.reconstruction_, det.flipad_, det.flipad_refusal_ = reconstruction, None, config["flipad_refusal"]
        if (folder / "flipad").is_dir():
            flipad_config, _ = read_saved(folder / "flipad", "flipad")
            adapter = GeneratorAdapter.from_module(module, reconstruction.latent_shape_, final_layer=flipad_config["final_layer"],
                                                   activation=flipad_config["activation"], device=device, seed=config["seed"])
            det.flipad_ = FlipadDetector.load(folder / "flipad", adapter, device)
        det.scales_ = {k: (float(v[0]), float(v[1])) for k, v in config["scales"].items()}
        det._calibrate(tensors["validation_scores"])
        det.fit_info_ = config["fit_info"]
        return det
