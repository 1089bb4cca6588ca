"""Reconstruction-loss attribution by full-generator inversion (Wang et al., NeurIPS 2023).

A generator reconstructs its own outputs from some latent with a far lower loss than anything
else. The latent space is searched for each input (:mod:`flipad.inversion.latent`) and the best
loss found is the anomaly score: by default the residual measured in JPEG's quantisation steps
(:mod:`flipad.inversion.metrics`), so a recompressed copy of an own output stays close while real
images and other generators' outputs do not; the pixel MSE for ``metric="mse"``. It needs no final-layer
structure, so it covers generators FLIPAD refuses (skip connections into the output,
non-invertible output activations).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..device import resolve_device, search_layout
from ..generators.adapter import weights_fingerprint
from ..generators.sampling import (
    generate_samples,
    probe_output_range,
    resolve_latent_shape,
)
from ..inversion.amortised import (
    Differentiate,
    Exits,
    LatentEncoder,
    encoder_steps_within,
    sketch_basis,
    train_encoder,
)
from ..inversion.latent import OBJECTIVES, SEARCH_METHODS, ReconstructionConfig, reconstruction_trajectories
from ..inversion.tangents import search_jacobian
from ..io.data import check_sample_shape, to_output_range
from ..io.perturb import PERTURBATIONS
from ..progress import stage
from .base import (
    INLINE,
    ROBUST_PERTURBATIONS,
    Detector,
    DetectorSettings,
    Scores,
    Seeds,
    Stages,
    register_kind,
)
from .calibration import check_fnr, search_resaves, search_settled
from .persist import check_generator, read_saved, write_saved

__all__ = ["LatentSearch", "ReconstructionConfig", "ReconstructionLossDetector", "ReconstructionSettings"]

logger = logging.getLogger(__name__)


class LatentSearch:
    """The latent search of one generator on one device: ``losses(samples)`` per item, the
    reconstruction family's expensive stage (:class:`~flipad.detectors.base.Stage`; its
    :meth:`trajectories_stage` gives the loss after each stage of the search).

    ``samples`` are uint8 images or floats in the output range, of the generator's output shape.
    The ``encoder-lm`` search needs ``encoder`` (:meth:`train_encoder` or a loaded one); ``exits``
    stop its items once their verdict is settled (:meth:`with_exits`). Its Jacobians are taken
    by ``differentiate``, by default the one :func:`~flipad.inversion.tangents.search_jacobian`
    picks for the module; the first is sketched along ``basis`` where one is set
    (:meth:`train_encoder` sets it when ``config.sketch`` asks for one).
    """

    def __init__(self, module: nn.Module, latent_shape: Sequence[int], output_range: tuple[float, float],
                 output_shape: Sequence[int], config: ReconstructionConfig, progress: bool = False,
                 encoder: LatentEncoder | None = None, exits: Exits = Exits(),
                 differentiate: Differentiate | None = None, basis: torch.Tensor | None = None):
        self.module = module
        self.latent_shape = tuple(latent_shape)
        self.output_range = output_range
        self.output_shape = tuple(output_shape)
        self.config = config
        self.progress = progress
        self.encoder = encoder
        self.exits = exits
        self.basis = basis
        if differentiate is None and config.method == "encoder-lm":
            differentiate = search_jacobian(module, self.latent_shape)
        self.differentiate = differentiate

    name = "latent-search"

    @property
    def device(self) -> str:
        """Where the search runs ("cpu", "cuda")."""
        return next(self.module.parameters()).device.type

    def run(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The stage: :meth:`losses`."""
        return self.losses(samples)

    def trajectories_stage(self) -> SearchTrajectories:
        """The stage that gives :meth:`trajectories`."""
        return SearchTrajectories(self)

    def with_exits(self, exits: Exits) -> LatentSearch:
        """The same search, stopping each item where ``exits`` settle its verdict."""
        return LatentSearch(self.module, self.latent_shape, self.output_range, self.output_shape, self.config,
                            self.progress, self.encoder, exits, self.differentiate, self.basis)

    def encoder_steps(self) -> int:
        """The batches :meth:`train_encoder` takes: ``config.encoder_steps`` within ``config.encoder_tflop``."""
        return encoder_steps_within(self.module, self.latent_shape, self.output_shape, self.output_range,
                                    self.config.encoder_steps, self.config.encoder_tflop)

    def train_encoder(self, steps: int | None = None) -> LatentEncoder:
        """Train (and keep) the amortised encoder of the ``encoder-lm`` search on fresh generator
        pairs for ``steps`` batches (default :meth:`encoder_steps`), and the directions its
        sketched first step works in (``config.sketch`` > 0)."""
        self.encoder = train_encoder(self.module, self.latent_shape, self.output_shape, self.output_range,
                                     self.encoder_steps() if steps is None else steps, seed=self.config.seed)
        if self.config.sketch:
            device = next(self.module.parameters()).device
            self.basis = sketch_basis(self.differentiate, self.latent_shape, self.config.sketch, self.config.seed, device)
        return self.encoder

    def losses(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Best reconstruction loss per item in the search's metric (small = the generator can make it)."""
        return self.trajectories(samples)[:, -1]

    def trajectories(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Per item, the loss after each stage of the search (``reconstruction_trajectories``)."""
        check_sample_shape(samples, self.output_shape)
        targets = to_output_range(samples, *self.output_range)
        return reconstruction_trajectories(self.module, self.latent_shape, targets, self.config, self.output_range,
                                           self.progress, self.encoder, self.exits, self.differentiate, self.basis)

    def fingerprint(self) -> str:
        """A hash of what the losses depend on besides the samples (weights, device kind, search)."""
        device = next(self.module.parameters()).device.type
        parts = {"generator": weights_fingerprint(self.module), "device": device, "search": asdict(self.config),
                 "latent_shape": list(self.latent_shape), "range": list(self.output_range)}
        if self.encoder is not None:
            parts["encoder"] = weights_fingerprint(self.encoder)
        if self.basis is not None:
            parts["sketch"] = hashlib.sha256(self.basis.cpu().numpy().tobytes()).hexdigest()
        if self.exits != Exits():
            parts["exits"] = asdict(self.exits)
        if self.differentiate is not None:
            parts["jacobian"] = getattr(self.differentiate, "name", "custom")
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class SearchTrajectories:
    """The stage of a :class:`LatentSearch` that gives every item's loss after each stage of the search."""

    name = "latent-trajectories"

    def __init__(self, search: LatentSearch):
        self.search = search

    @property
    def device(self) -> str:
        return self.search.device

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.search.fingerprint()}\0trajectories".encode()).hexdigest()

    def run(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.search.trajectories(samples)


@dataclass(frozen=True)
class ReconstructionSettings:
    """The reconstruction family's options (``--set reconstruction.KEY=VALUE``)."""

    method: str = field(default="encoder-lm", metadata={
        "help": "the latent search: encoder-lm (an encoder trained on the generator's own pairs, refined by "
                "Levenberg-Marquardt) or adam (screened random starts + Adam)"})
    encoder_steps: int = field(default=ReconstructionConfig.encoder_steps,
                               metadata={"help": "encoder-lm: training batches of the encoder, at most"})
    encoder_tflop: float = field(default=ReconstructionConfig.encoder_tflop, metadata={
        "help": "encoder-lm: the encoder's training budget in TFLOP: larger generators train fewer batches "
                "(at least 100); 0 trains encoder_steps"})
    sketch: int = field(default=ReconstructionConfig.sketch, metadata={
        "help": "encoder-lm: at most this many latent directions the first step works in (a sketched Jacobian); "
                "0 takes every Jacobian in full"})
    fixed_point_steps: int = field(default=ReconstructionConfig.fixed_point_steps, metadata={
        "help": "encoder-lm: fixed-point steps z + E(x) - E(G(z)) that refine the encoder's start before any "
                "Jacobian (one encoder and one generator pass each); 0 takes none"})
    objective: str = field(default=ReconstructionConfig.objective, metadata={
        "help": "encoder-lm: what the Levenberg-Marquardt steps minimise: mse (the pixel MSE) or metric (the "
                "reconstruction metric itself, which the thresholds are set in)"})
    steps: int = field(default=ReconstructionConfig.steps, metadata={"help": "adam: steps of the search per item"})
    starts: int = field(default=ReconstructionConfig.starts, metadata={"help": "adam: starts of the search per item"})
    perturbations: tuple[str, ...] = field(default=ROBUST_PERTURBATIONS, metadata={
        "help": "re-saves the thresholds are also calibrated on, comma-separated (e.g. jpeg q90,jpeg q80)"})
    n_perturbed: int = field(default=300, metadata={
        "help": "validation samples per re-save the thresholds are also set on (at most the validation samples)"})

    def __post_init__(self) -> None:
        if self.method not in SEARCH_METHODS:
            raise ValueError(f"reconstruction.method {self.method!r}: use one of {', '.join(SEARCH_METHODS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"reconstruction.objective {self.objective!r}: use one of {', '.join(OBJECTIVES)}")
        for name in self.perturbations:
            if name not in PERTURBATIONS:
                raise ValueError(f"reconstruction.perturbations: unknown {name!r}; use any of {', '.join(PERTURBATIONS)}")
        for name, low in (("encoder_steps", 1), ("encoder_tflop", 0), ("sketch", 0), ("fixed_point_steps", 0), ("steps", 10), ("starts", 1), ("n_perturbed", 20)):
            if getattr(self, name) < low:
                raise ValueError(f"reconstruction.{name} {getattr(self, name)}: use at least {low}")

    def config(self, seed: int) -> ReconstructionConfig:
        """The latent search these settings ask for."""
        return ReconstructionConfig(steps=self.steps, starts=self.starts, seed=seed,
                                    candidates=max(ReconstructionConfig.candidates, self.starts),
                                    method=self.method, encoder_steps=self.encoder_steps,
                                    encoder_tflop=self.encoder_tflop, sketch=self.sketch,
                                    fixed_point_steps=self.fixed_point_steps, objective=self.objective)


@register_kind
class ReconstructionLossDetector(Detector):
    """Attribution by the best reconstruction loss of a full-generator latent search.

    Works for any differentiable generator mapping ``(N, *latent_shape)`` latents to samples.
    The score has nothing to learn: ``fit`` only sets the thresholds from held-out samples of
    the generator (drawn when not given). ``fit`` takes ``generated``/``real``/``negatives`` for
    the same surface as :class:`FlipadDetector`; this method does not use them.
    """

    kind = "reconstruction"
    description = "reconstruction loss of a full-generator latent search"
    Settings = ReconstructionSettings
    diagnostics = {"latent_loss": "the best reconstruction loss the latent search reached (in JPEG's quantisation "
                                  "steps)"}

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
        seed: int = 0,
        perturbations: Sequence[str] = (),
        n_perturbed: int | None = None,
    ):
        self._module = module
        self.latent_shape = latent_shape
        self.fnr = check_fnr(fnr)
        self.n_validation = n_validation
        self.config = config or ReconstructionConfig()
        self.output_range = output_range
        self.device = device
        self.progress = progress
        self.seed = seed
        self.perturbations = tuple(perturbations)
        self.n_perturbed = n_perturbed
        for name in self.perturbations:
            if name not in PERTURBATIONS:
                raise ValueError(f"unknown perturbation {name!r}; use any of {', '.join(PERTURBATIONS)}")

    @property
    def module(self) -> nn.Module:
        return self._module

    @classmethod
    def from_settings(cls, module: nn.Module, latent_shape: Sequence[int] | None,
                      settings: DetectorSettings) -> ReconstructionLossDetector:
        own = settings.of(cls)
        return cls(module, latent_shape, fnr=settings.fnr, n_validation=settings.n_validation,
                   config=own.config(settings.seed), device=settings.device, progress=settings.progress,
                   seed=settings.seed, perturbations=own.perturbations,
                   n_perturbed=min(own.n_perturbed, settings.n_validation))

    def _prepare(self) -> None:
        self.device_ = resolve_device(self.device)
        self.module_ = self._module.to(self.device_).eval()
        self.latent_shape_ = resolve_latent_shape(self._module, self.latent_shape)
        self.range_ = self.output_range or probe_output_range(self.module_, self.latent_shape_, self.device_)
        with torch.no_grad():
            probe = self.module_(torch.zeros(2, *self.latent_shape_, device=self.device_))
        self.output_shape_ = tuple(probe.shape[1:])
        self.fingerprint_ = weights_fingerprint(self.module_)
        self.search_ = LatentSearch(search_layout(self.module_, self.latent_shape_), self.latent_shape_, self.range_,
                                    self.output_shape_, self.config, progress=self.progress)

    def generate(self, n: int, seed: int) -> np.ndarray:
        if not hasattr(self, "search_"):
            self._prepare()
        return generate_samples(self.module_, self.latent_shape_, n, seed, self.range_, self.device_)

    def fit(
        self,
        generated: np.ndarray | None = None,
        real: np.ndarray | None = None,
        negatives: Sequence[np.ndarray] | np.ndarray | None = None,
        validation: np.ndarray | None = None,
        stages: Stages = INLINE,
    ) -> ReconstructionLossDetector:
        """Set the thresholds from held-out samples of the generator (``validation``, else drawn
        fresh) and, for each of ``perturbations``, from the first ``n_perturbed`` of them after that
        perturbation (so the FNR holds for recompressed copies too). Returns self.

        The first re-save (the lowest JPEG quality) is searched to its end; an item of a later
        re-save, and then of the pristine set, stops once its loss is within the largest quantile
        found so far (``fit_info_["perturbations"][name]["searched_until"]``, the pristine set's
        ``fit_info_["searched_until"]``), which leaves every threshold as the exhaustive search
        would set it: those losses are exact above that level and upper bounds below it."""
        self._prepare()
        encoder_steps = None
        if self.config.method == "encoder-lm":
            encoder_steps = self.search_.encoder_steps()
            with stage("train the latent search's encoder", encoder_steps, "batches"):
                self.search_.train_encoder(encoder_steps)
        if validation is None:
            validation = self.generate(self.n_validation, seed=Seeds(self.seed).validation)
        conditions, stopped_at, accept = {}, {}, 0.0
        if self.perturbations and validation.ndim == 4 and validation.dtype == np.uint8:
            # then the pristine items too stop once below the largest quantile (most at their start)
            conditions, stopped_at, accept = search_resaves(
                lambda name, items, level: stages.run(self.search_.with_exits(Exits(accept=level)).trajectories_stage(),
                                                      items, f"generated (validation, {name})"),
                validation[: self.n_perturbed or len(validation)], self.perturbations, self.fnr)
        pristine = search_settled(lambda items, level: stages.run(
            self.search_.with_exits(Exits(accept=level)).trajectories_stage(), items, "generated (validation)"),
            validation, accept, self.fnr)
        self._calibrate(pristine[:, -1], {name: t[:, -1] for name, t in conditions.items()})
        screens_cut = self._set_exits([pristine, *conditions.values()])
        self.fit_info_ = {"n_validation": len(validation), "searched_until": accept, "screens_cut_held_out": screens_cut,
                          "validation_settled_early": float((pristine[:, -1] <= accept).double().mean()),
                          "encoder_steps": encoder_steps,
                          "perturbations": {name: {"n": len(t), "loss_median": float(t[:, -1].median()),
                                                   "searched_until": stopped_at[name]}
                                            for name, t in conditions.items()}}
        return self

    def _anomaly(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Best reconstruction loss per sample in the search's metric (small = the generator can make it)."""
        self._check_fitted()
        return self.search_.losses(samples)

    def latent_search(self) -> LatentSearch | None:
        self._check_fitted()
        return self.search_ if self.search_.encoder is not None else None

    def calibrated_jpeg_quality(self) -> float | None:
        self._check_fitted()
        qualities = [PERTURBATIONS[name][1] for name in self.condition_scores_ if PERTURBATIONS[name][0] == "jpeg"]
        return float(min(qualities)) if qualities else None

    def _set_exits(self, parts: list[torch.Tensor]) -> float | None:
        """The search's early exits (``encoder-lm``): accept at the strictest threshold, screen from
        the own calibration trajectories (``parts``: one per condition) against the loosest; the
        share of those items the screens cut when set on the other half (:meth:`Exits.held_out_cuts`)."""
        if self.config.method != "encoder-lm":
            self.exits_ = Exits()
            return None
        thresholds = self.thresholds_.values()
        self.exits_, cuts = Exits.checked(parts, threshold=max(thresholds), accept=min(thresholds))
        return cuts

    def score(self, samples: np.ndarray | torch.Tensor, stages: Stages = INLINE, exhaustive: bool = False) -> Scores:
        """Scores (the negated loss) with the loss itself as a diagnostic.

        By default each item's search stops where its verdict is settled (:class:`Exits`): an
        attributed item reports a loss at or below the threshold, a rejected one a loss above it,
        not always the lowest the search would reach. ``exhaustive=True`` runs every search to its
        end (the exact loss, for evaluation), with what the default reports as ``attributed``."""
        self._check_fitted()
        if not exhaustive:
            return self._loss_scores(stages.run(self.search_.with_exits(self.exits_), samples, "score"))
        trajectories = stages.run(self.search_.trajectories_stage(), samples, "score")
        return replace(self._loss_scores(trajectories[:, -1]), attributed=self._loss_scores(self.exits_.settle(trajectories)))

    def _loss_scores(self, losses: torch.Tensor) -> Scores:
        return self._verdict_scores(losses, {"latent_loss": losses.double().numpy()})

    def fit_summary(self) -> dict[str, float]:
        """The level calibration searched the milder conditions down to, the share of pristine
        validation items within it at their first stop (their losses are upper bounds there), and
        (``encoder-lm``) the share of own calibration items the screens cut when set on the other
        half of them."""
        cuts = self.fit_info_.get("screens_cut_held_out")
        return {"calibration_searched_until": float(self.fit_info_.get("searched_until", 0.0)),
                "validation_settled_early": float(self.fit_info_.get("validation_settled_early", 0.0)),
                **({} if cuts is None else {"screens_cut_held_out": float(cuts)})}

    def generator_info(self) -> dict[str, Any]:
        return {"latent_shape": list(self.latent_shape_)}

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The shape of one sample of the generator."""
        self._check_fitted()
        return self.output_shape_

    @property
    def sample_range(self) -> tuple[float, float]:
        self._check_fitted()
        return self.range_

    def save(self, path: str | Path) -> Path:
        """Write ``config.json`` and ``tensors.safetensors`` into the folder ``path`` (no pickles)."""
        self._check_fitted()
        config = {"generator_sha256": self.fingerprint_, "latent_shape": list(self.latent_shape_),
                  "output_shape": list(self.output_shape_), "output_range": list(self.range_), "fnr": list(self.fnr),
                  "n_validation": self.n_validation, "search": asdict(self.config), "fit_info": self.fit_info_,
                  "perturbations": list(self.condition_scores_), "n_perturbed": self.n_perturbed,
                  "exits": asdict(self.exits_)}
        tensors = {"validation_scores": self.validation_scores_,
                   **{f"condition.{name}": s for name, s in self.condition_scores_.items()}}
        if self.search_.encoder is not None:
            tensors |= {f"encoder.{k}": v for k, v in self.search_.encoder.state_dict().items()}
        if self.search_.basis is not None:
            tensors["sketch_basis"] = self.search_.basis
        return write_saved(path, "reconstruction", config, tensors)

    @classmethod
    def load(cls, path: str | Path, module: nn.Module, device: str = "auto",
             latent_shape: Sequence[int] | None = None) -> ReconstructionLossDetector:
        """Load a detector saved by :meth:`save` for the same generator (checked by weight hash)."""
        config, tensors = read_saved(path, "reconstruction")
        det = cls(module, config["latent_shape"], config["fnr"], config["n_validation"],
                  ReconstructionConfig.from_dict(config["search"]), tuple(config["output_range"]), device, progress=False,
                  perturbations=config.get("perturbations", ()), n_perturbed=config.get("n_perturbed"))
        det._prepare()
        check_generator(path, config["generator_sha256"], det.fingerprint_)
        if det.config.method == "encoder-lm":
            encoder = LatentEncoder(det.output_shape_, det.latent_shape_).to(det.device_)
            encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in tensors.items() if k.startswith("encoder.")})
            det.search_.encoder = encoder.eval()
            if "sketch_basis" in tensors:
                det.search_.basis = tensors["sketch_basis"].to(det.device_)
        det._calibrate(tensors["validation_scores"],
                       {name: tensors[f"condition.{name}"] for name in config.get("perturbations", ())})
        saved_exits = config.get("exits", {})  # detectors saved before the exits had none
        det.exits_ = Exits(saved_exits.get("accept", 0.0), tuple(saved_exits.get("screen", ())))
        det.fit_info_ = config["fit_info"]
        return det
