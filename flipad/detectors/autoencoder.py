"""Latent-diffusion autoencoders: "was this image decoded by my VAE?" (diffusers ``AutoencoderKL``).

Every image a latent diffusion model makes leaves through its autoencoder's decoder, a white-box
generator from a latent of shape ``(C, H/f, W/f)`` to pixels. This module is the whole family:

- ``diffusers:FOLDER`` generator specs (a folder written by ``save_pretrained``; nothing is
  downloaded): :class:`AutoencoderGenerator` is the decoder, the latent scaling and the clamp to
  the output range the pipelines apply, as one generator whose fingerprint is the decoder's
  weights (two models sharing a decoder are one generator);
- the ``autoencoder`` kind, the default for such generators: each item is encoded once (the
  posterior mean), decoded, and refined on the decoder input (:class:`DecoderSearch`) by steps
  ``z += C(x - D(z))`` with ``C`` a linear map from pixel residuals to latent steps fitted at
  onboarding (:mod:`flipad.inversion.corrector`; no encoder pass), then a few matrix-free
  Gauss-Newton steps (products with J and J^T by reverse-mode passes, conjugate gradients, J never
  formed), optionally with steps that use the encoder as the decoder's approximate inverse
  (``z += E(x) - E(D(z))``) between the two. The score is the residual in JPEG's
  quantisation steps (:mod:`flipad.inversion.metrics`), calibrated on the owner's held-out decoded
  items, pristine and re-saved, with early exits that settle an item once its verdict cannot change;
- the ``aedr`` kind: the training-free double-reconstruction ratio of AEDR (Wang et al., AAAI 2026),
  ``MSE(x, x1) / MSE(x1, x2)`` with ``x1 = D(E(x))`` and ``x2 = D(E(x1))``, thresholds set on
  held-out own items (not on the items it then scores): the cheap screen to compare against;
- the owner's own items: decoded encodings of real images (exactly outputs of this decoder) unless
  the owner gives the images their model made, and the look-alikes an owner meets: an autoencoder
  of the same configuration trained from another seed, and the same autoencoder with a fine-tuned
  decoder (:meth:`AutoencoderDetector.lookalikes`).

Items are scored at the model's native size only; another size is refused by the scoring layer,
never resampled.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from ..device import resolve_device
from ..generators.adapter import weights_fingerprint
from ..generators.loading import GeneratorLoadError, register_generator_scheme
from ..inversion.amortised import Exits, anderson_step
from ..inversion.corrector import LinearCorrector, fit_corrector
from ..inversion.metrics import ResidualMetric
from ..io.data import check_sample_shape, quantize, to_output_range
from ..io.perturb import PERTURBATIONS, perturb
from ..progress import report, stage
from .base import INLINE, ROBUST_PERTURBATIONS, Detector, DetectorSettings, Scores, Seeds, Stages, register_kind
from .calibration import check_fnr, lowest_quantile, search_resaves
from .persist import check_generator, read_saved, write_saved

__all__ = ["AedrDetector", "AedrSettings", "AutoencoderDetector", "AutoencoderGenerator", "AutoencoderSettings", "DecoderSearch",
           "load_autoencoder", "train_autoencoder"]

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
OUTPUT_RANGE = (-1.0, 1.0)  # what the decoder makes; the pipelines map it to [0, 1] and clamp
# the layout of DecoderSearch's trajectories its screens are set on: an item that switched early
# skips the encoder steps' later columns (detectors saved before it existed had one column per step)
SCREEN_COLUMNS = "by phase"
PIXELS_PER_BATCH = 2**17  # items per batch = this / pixels per item: memory scales with the image, not the count


def load_autoencoder(path: str | Path) -> AutoencoderGenerator:
    """The ``AutoencoderKL`` saved in the folder ``path`` (``save_pretrained``: ``config.json`` and
    ``diffusion_pytorch_model.safetensors``), built from its config; nothing is downloaded."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise GeneratorLoadError("diffusers:FOLDER needs the diffusers package: pip install 'flipad[diffusers]'") from None
    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file():
        raise GeneratorLoadError(f"{folder} holds no {CONFIG_FILE}: give the folder AutoencoderKL.save_pretrained wrote")
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise GeneratorLoadError(f"{folder} holds a {config['_class_name']}, not an AutoencoderKL")
    try:
        vae = AutoencoderKL.from_config(config)
    except (TypeError, ValueError) as exc:
        raise GeneratorLoadError(f"{folder / CONFIG_FILE} is not an AutoencoderKL config ({exc})") from exc
    weights = folder / WEIGHTS_FILE
    if weights.is_file():
        try:
            vae.load_state_dict(load_file(str(weights)))
        except RuntimeError as exc:
            raise GeneratorLoadError(f"{weights} does not fit {folder / CONFIG_FILE}: {str(exc).splitlines()[0]}") from exc
    else:  # a bundle carries the config alone; its weights are loaded after this
        logger.info("%s has no %s: the autoencoder is built from its config alone", folder, WEIGHTS_FILE)
    return AutoencoderGenerator(vae)


register_generator_scheme("diffusers", load_autoencoder, (CONFIG_FILE,))


class AutoencoderGenerator(nn.Module):
    """An ``AutoencoderKL`` as a generator: a latent in the diffusion model's scale
    ``(latent_channels, H/f, W/f)`` to pixels in [-1, 1], as the pipelines decode
    (``latent / scaling_factor + shift_factor``, decode, clamp). ``encode`` gives the posterior
    mean in the same scale. The attention runs through the plain processor, which second-order
    autograd (the search's J products) supports."""

    default_detector = "autoencoder"

    def __init__(self, vae: nn.Module):
        super().__init__()
        from diffusers.models.attention_processor import AttnProcessor

        self.vae = vae.eval()
        if getattr(vae, "attn_processors", None):
            vae.set_attn_processor(AttnProcessor())
        config = vae.config
        self.scaling_factor = float(config.scaling_factor or 1.0)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        factor = 2 ** (len(config.block_out_channels) - 1)
        self.latent_shape = (int(config.latent_channels), height // factor, width // factor)
        self.image_shape = (int(config.out_channels), height, width)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor + self.shift_factor).sample.clamp(*OUTPUT_RANGE)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The posterior mean of ``images`` (in [-1, 1]) in the decoder's latent scale."""
        return (self.vae.encode(images).latent_dist.mean - self.shift_factor) * self.scaling_factor

    def fingerprint_state(self) -> dict[str, torch.Tensor]:
        """What the outputs depend on: the decoder's weights and the latent scaling."""
        state = {k: v for k, v in self.state_dict().items() if k.startswith(("vae.decoder.", "vae.post_quant_conv."))}
        return {**state, "scaling": torch.tensor([self.scaling_factor, self.shift_factor], dtype=torch.float64)}

    def batches(self, n: int) -> list[slice]:
        """Slices of ``n`` items in batches whose memory is bounded by the image size."""
        size = max(1, PIXELS_PER_BATCH // (self.image_shape[1] * self.image_shape[2]))
        return [slice(start, start + size) for start in range(0, n, size)]

    @torch.no_grad()
    def reconstruct(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """``D(E(x))`` of uint8 images, as 8-bit images: outputs of this decoder."""
        x = to_output_range(images, *OUTPUT_RANGE)
        device = next(self.parameters()).device
        parts = [quantize(self(self.encode(x[part].to(device))), *OUTPUT_RANGE) for part in self.batches(len(x))]
        return np.concatenate(parts) if parts else np.empty((0, *self.image_shape), np.uint8)


def _autoencoder(module: nn.Module) -> AutoencoderGenerator:
    if not isinstance(module, AutoencoderGenerator):
        raise ValueError(f"the autoencoder families take an autoencoder (--generator diffusers:FOLDER), not a "
                         f"{type(module).__name__}")
    return module


class DecoderSearch:
    """The ``autoencoder`` family's stage: per item, the residual after each step of a search on
    the decoder input, started from the encoder's posterior mean.

    Step 0 is ``D(E(x))`` (one encoder and one decoder pass). Three phases of steps follow, each
    item taking them in order (a phase of no steps is skipped):

    - ``corrector_steps`` steps ``z += a C(x - D(z))`` with ``C`` a fitted
      :class:`~flipad.inversion.corrector.LinearCorrector` (one decoder pass and ``C``'s small
      share of one; no encoder pass);
    - ``encoder_steps`` steps using the encoder as the decoder's approximate inverse: ``z += a
      (E(x) - E(D(z)))``, a fixed point where the decoded item encodes as the item does, which an
      item this decoder made reaches at its own latent (one encoder and one decoder pass);
    - ``steps`` Gauss-Newton steps for the pixel residual, ``(J^T J + lam I) d = -J^T r`` solved by
      ``cg_steps`` conjugate gradients with J products from reverse-mode passes (``J v`` as the
      derivative of a vector-Jacobian product), so their cost does not grow with the latent size;
      a step is kept only where the loss falls (Levenberg-Marquardt damping).

    In the two fixed-point phases ``a`` starts at 1 and halves where a step does not lower the
    loss; with ``anderson``, an item's steps after its first in a phase are Anderson-accelerated;
    with ``switch``, an item instead leaves such a phase at its first step that does not lower the
    loss and takes the next phase's steps (none: it is done), so it finishes early. Losses are
    reported in ``metric``. ``exits`` stop an item once its verdict is settled, each screen applying
    to the items at its column of :meth:`run`'s trajectories (so an item that switched early meets
    the next phase's screens, not those of the steps it skipped). Of the last run, per item:
    ``encoder_passes_``, and ``passes_`` in decoder-pass equivalents (a forward 1, a
    vector-Jacobian product 2, a Jacobian-vector product 2).
    """

    name = "decoder-search"

    def __init__(self, module: AutoencoderGenerator, steps: int, cg_steps: int, exits: Exits = Exits(),
                 encoder_steps: int = 0, switch: bool = False, anderson: bool = False,
                 corrector: LinearCorrector | None = None, corrector_steps: int = 0):
        if corrector_steps and corrector is None:
            raise ValueError("corrector_steps need a fitted corrector")
        self.module = module
        self.steps = steps
        self.cg_steps = cg_steps
        self.exits = exits
        self.encoder_steps = encoder_steps
        self.switch = switch
        self.anderson = anderson
        self.corrector = corrector if corrector_steps else None
        self.corrector_steps = corrector_steps
        self.metric = ResidualMetric("jpeg", module.image_shape, OUTPUT_RANGE)

    @property
    def device(self) -> str:
        return next(self.module.parameters()).device.type

    @property
    def phases(self) -> tuple[int, int, int]:
        """Steps per phase: corrector, encoder, Gauss-Newton."""
        return self.corrector_steps, self.encoder_steps, self.steps

    def with_exits(self, exits: Exits) -> DecoderSearch:
        """The same search, stopping each item where ``exits`` settle its verdict."""
        return DecoderSearch(self.module, self.steps, self.cg_steps, exits, self.encoder_steps, self.switch,
                             self.anderson, self.corrector, self.corrector_steps)

    def fingerprint(self) -> str:
        parts = {"generator": weights_fingerprint(self.module), "device": self.device, "steps": self.steps,
                 "cg_steps": self.cg_steps, "exits": asdict(self.exits), "encoder_steps": self.encoder_steps,
                 "switch": self.switch, "anderson": self.anderson, "columns": SCREEN_COLUMNS}
        if self.corrector is not None:
            weight = self.corrector.weight.double().numpy().tobytes()
            parts |= {"corrector_steps": self.corrector_steps, "corrector": hashlib.sha256(weight).hexdigest()}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def run(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Per item, the loss after each step ``(n, 1 + corrector_steps + encoder_steps + steps)``:
        column 0 at the start, then one column per step of each phase in order. An item that left
        a phase after its ``k``-th step there (the failed one, its loss unchanged) has NaN in that
        phase's later columns: it never was there, so those columns' screens do not apply to it.
        Once an item exits, its later entries repeat the loss it stopped at."""
        check_sample_shape(samples, self.module.image_shape)
        targets = to_output_range(samples, *OUTPUT_RANGE)
        out = torch.empty(len(targets), sum(self.phases) + 1, dtype=torch.float64)
        passes = torch.zeros(len(targets), 2)
        for part in self.module.batches(len(targets)):
            out[part], passes[part] = self._search(targets[part].to(next(self.module.parameters()).device))
        self.encoder_passes_, self.passes_ = passes[:, 0], passes[:, 1]
        return out

    def _loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.metric((outputs - targets).double()).cpu()

    def _search(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        module, n, lengths = self.module, len(x), torch.tensor(self.phases)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])  # the column before each phase
        columns = int(lengths.sum()) + 1
        with torch.no_grad():
            encoded = module.encode(x)
            z = encoded.clone()
            decoded = module(z)
        loss = self._loss(decoded, x)
        trajectory = torch.full((n, columns), math.nan, dtype=torch.float64)
        trajectory[:, 0] = loss
        at = torch.zeros(n, dtype=torch.long)  # per item, the column of its current loss
        passes = torch.ones(n, 2)  # per item: encoder passes, decoder-pass equivalents
        rate = torch.ones(n)  # the fixed-point steps' size
        history = torch.zeros(2, *z.shape, dtype=z.dtype, device=z.device)  # per item: the last step's z and pull
        has_history = torch.zeros(n, dtype=torch.bool)
        damping = torch.full((n,), 1e-3)
        phase = torch.zeros(n, dtype=torch.long)  # per item: 0 corrector, 1 encoder, 2 Gauss-Newton, 3 done
        left = lengths[0].repeat(n)  # per item: the steps left in its phase
        active = torch.ones(n, dtype=torch.bool)
        screen = torch.tensor([*self.exits.screen, *[math.inf] * columns][:columns], dtype=torch.float64)
        for _ in range(columns):
            self._advance(phase, left, lengths, rate, has_history)
            active &= (loss > self.exits.accept) & (loss <= screen[at]) & (phase < len(lengths))
            if not active.any():
                break
            taking = [(active & (phase == p)).nonzero().flatten() for p in range(len(lengths))]
            for p, idx in enumerate(taking[:2]):
                if not len(idx):
                    continue
                moved, out, cost, pulled = self._fixed_point_step(p, z[idx], decoded[idx], x[idx], encoded[idx],
                                                                  rate[idx], history[:, idx], has_history[idx])
                history[0, idx], history[1, idx] = z[idx], pulled
                has_history[idx] = self.anderson
                better = self._take(idx, moved, out, cost, x, z, decoded, loss, passes)
                rate[idx] = torch.where(better, rate[idx], rate[idx] / 2)
                if self.switch:
                    left[idx[~better]] = 1  # this step is its last in the phase
            if len(taking[2]):
                idx = taking[2]
                better = self._take(idx, *self._gauss_newton(z[idx], decoded[idx], x[idx], damping[idx]),
                                    x, z, decoded, loss, passes)
                damping[idx] = torch.where(better, damping[idx] / 3, damping[idx] * 5)
            stepped = active.nonzero().flatten()
            left[stepped] -= 1
            at[stepped] = torch.maximum(at[stepped], offsets[phase[stepped]]) + 1
            trajectory[stepped, at[stepped]] = loss[stepped]
        later = torch.arange(columns) > at[:, None]
        trajectory[later] = loss[:, None].expand(n, columns)[later]
        return trajectory, passes

    @staticmethod
    def _advance(phase: torch.Tensor, left: torch.Tensor, lengths: torch.Tensor, rate: torch.Tensor,
                 has_history: torch.Tensor) -> None:
        """Move the items with no steps left in their phase to the next phase that has steps (in place)."""
        while True:
            moving = (left <= 0) & (phase < len(lengths))
            if not moving.any():
                return
            phase[moving] += 1
            going = moving & (phase < len(lengths))
            left[going] = lengths[phase[going]]
            rate[moving], has_history[moving] = 1.0, False

    def _take(self, idx: torch.Tensor, z_new: torch.Tensor, out_new: torch.Tensor, cost: tuple[float, float],
              x: torch.Tensor, z: torch.Tensor, decoded: torch.Tensor, loss: torch.Tensor,
              passes: torch.Tensor) -> torch.Tensor:
        """Keep the step of items ``idx`` where it lowers their loss (in place) and count its cost
        (encoder passes, decoder-pass equivalents); whether it did, per item."""
        new = self._loss(out_new, x[idx])
        better = new < loss[idx]
        keep = idx[better]
        z[keep], decoded[keep], loss[keep] = z_new[better], out_new[better], new[better]
        passes[idx] += torch.tensor(cost)
        return better

    @torch.no_grad()
    def _fixed_point_step(self, phase: int, z: torch.Tensor, decoded: torch.Tensor, x: torch.Tensor,
                          encoded: torch.Tensor, rate: torch.Tensor, history: torch.Tensor, has_history: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float], torch.Tensor]:
        """The step ``z + rate f`` per item, with ``f = C(x - D(z))`` (``phase`` 0) or ``f = E(x) -
        E(D(z))`` (``phase`` 1); its decoding, its cost (encoder passes, decoder-pass equivalents)
        and ``f``. With ``anderson``, an item with a previous step in the phase (``history``: its
        ``z`` and ``f``) takes the Anderson-accelerated step of memory 1 instead: ``z - g dz + rate
        (f - g df)``, ``g`` the least-squares fit of ``f`` by ``df`` (the secant through the two
        points), at no extra pass."""
        if phase == 0:
            pulled, cost = self.corrector(x - decoded), (0.0, 1.0 + self.corrector.share)
        else:
            pulled, cost = encoded - self.module.encode(decoded), (1.0, 1.0)
        base, towards = anderson_step(z, pulled, (history[0], history[1]), has_history)
        moved = base + rate.to(z).view(-1, *([1] * (z.dim() - 1))) * towards
        return moved, self.module(moved), cost, pulled

    def _gauss_newton(self, z: torch.Tensor, decoded: torch.Tensor, x: torch.Tensor,
                      damping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float]]:
        """One damped Gauss-Newton step per item by conjugate gradients; its cost (no encoder pass,
        its decoder-pass equivalents)."""
        def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (a * b).flatten(1).sum(1)

        def per_item(v: torch.Tensor) -> torch.Tensor:
            return v.view(-1, *([1] * (z.dim() - 1)))

        with torch.enable_grad():
            point = z.detach().requires_grad_(True)
            output = self.module(point)
            dual = (decoded - x).detach().requires_grad_(True)
            # J^T u at u = r, the gradient, as a function linear in u: its derivative along v is J v
            (pulled,) = torch.autograd.grad(output, point, dual, create_graph=True)
            gradient = pulled.detach()
            shift = damping.to(z)
            residual, direction = -gradient, -gradient
            step = torch.zeros_like(z)
            norm = dot(residual, residual)
            for _ in range(self.cg_steps):
                (jv,) = torch.autograd.grad(pulled, dual, direction, retain_graph=True)  # J v
                (jtjv,) = torch.autograd.grad(output, point, jv, retain_graph=True)  # J^T J v
                product = jtjv + per_item(shift) * direction
                alpha = norm / dot(direction, product).clamp_min(1e-30)
                step = step + per_item(alpha) * direction
                residual = residual - per_item(alpha) * product
                new_norm = dot(residual, residual)
                direction = residual + per_item(new_norm / norm.clamp_min(1e-30)) * direction
                norm = new_norm
        with torch.no_grad():
            moved = z + step.detach()
            return moved, self.module(moved), (0.0, 3.0 + 4.0 * self.cg_steps + 1.0)


@dataclass(frozen=True)
class AedrSettings:
    """The ``aedr`` family's options (``--set aedr.KEY=VALUE``), shared by the ``autoencoder`` family."""

    perturbations: tuple[str, ...] = field(default=ROBUST_PERTURBATIONS, metadata={
        "help": "re-saves the thresholds are also calibrated on, comma-separated (e.g. jpeg q90,jpeg q80)"})
    n_perturbed: int = field(default=300, metadata={
        "help": "held-out own items per re-save the thresholds are also set on (at most the validation items)"})
    lookalike_batch: int = field(default=16, metadata={"help": "images per training step of the look-alike autoencoders"})

    def __post_init__(self) -> None:
        for name in self.perturbations:
            if name not in PERTURBATIONS:
                raise ValueError(f"perturbations: unknown {name!r}; use any of {', '.join(PERTURBATIONS)}")
        for name, low in self._lower_bounds():
            if getattr(self, name) < low:
                raise ValueError(f"{name} {getattr(self, name)}: use at least {low}")

    def _lower_bounds(self) -> tuple[tuple[str, int], ...]:
        return (("n_perturbed", 20), ("lookalike_batch", 1))


@dataclass(frozen=True)
class AutoencoderSettings(AedrSettings):
    """The ``autoencoder`` family's options (``--set autoencoder.KEY=VALUE``)."""

    # steps by a linear corrector fitted at onboarding cost a decoder pass each and no encoder pass
    # and settle most own items, pristine and re-saved; the few whose start is poor stall there and
    # are closed by the Gauss-Newton steps (docs/design.md, "A linear corrector")
    corrector_steps: int = field(default=10, metadata={
        "help": "steps z += C(x - D(z)) after D(E(x)), C a linear map from pixel residuals to latent steps fitted at "
                "onboarding (a decoder pass each, no encoder pass), each stopped early once the verdict is settled"})
    encoder_steps: int = field(default=0, metadata={
        "help": "steps z += E(x) - E(D(z)) after the corrector steps (an encoder and a decoder pass each)"})
    steps: int = field(default=2, metadata={
        "help": "Gauss-Newton steps on the decoder input after those (4 * cg_steps + 4 decoder-pass equivalents each)"})
    cg_steps: int = field(default=4, metadata={"help": "conjugate-gradient iterations per Gauss-Newton step"})
    switch: bool = field(default=False, metadata={
        "help": "an item leaves the corrector or encoder steps at its first one that does not lower its residual and "
                "takes the next steps (off: it halves the step's size and goes on)"})
    anderson: bool = field(default=True, metadata={
        "help": "each corrector or encoder step after an item's first is Anderson-accelerated (memory 1: the secant "
                "through its last two steps), at no extra pass"})

    def _lower_bounds(self) -> tuple[tuple[str, int], ...]:
        return (*super()._lower_bounds(), ("corrector_steps", 0), ("encoder_steps", 0), ("steps", 0), ("cg_steps", 1))


class _AutoencoderFamily(Detector):
    """What both autoencoder kinds share: own items from real images, look-alikes, calibration on
    held-out own items pristine and re-saved, persistence."""

    Settings: Any = AedrSettings
    SAVED_BEFORE: dict[str, Any] = {}  # settings added later, as the detectors saved before them ran

    def __init__(self, module: nn.Module, fnr: Sequence[float] = (0.005,), n_validation: int = 1000,
                 settings: AedrSettings | None = None, device: str = "auto", seed: int = 0,
                 progress: bool = True):
        self._module = _autoencoder(module)
        self.fnr = check_fnr(fnr)
        self.n_validation = n_validation
        self.settings = settings or self.Settings()
        self.device = device
        self.seed = seed
        self.progress = progress

    @classmethod
    def from_settings(cls, module: nn.Module, latent_shape: Sequence[int] | None, settings: DetectorSettings):
        own = settings.of(cls)
        return cls(module, settings.fnr, settings.n_validation, replace(own, n_perturbed=min(own.n_perturbed,
                   settings.n_validation)), settings.device, settings.seed, settings.progress)

    @property
    def module(self) -> AutoencoderGenerator:
        return self._module

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self._module.image_shape

    @property
    def sample_range(self) -> tuple[float, float]:
        return OUTPUT_RANGE

    def generator_info(self) -> dict[str, Any]:
        return {"latent_shape": list(self._module.latent_shape)}

    def sample_shape(self) -> tuple[int, ...]:
        return self._module.image_shape

    def generate(self, n: int, seed: int) -> np.ndarray:
        raise ValueError("an autoencoder's own items are decoded images: use own_samples(n, seed, real)")

    def own_samples(self, n: int, seed: int, real: np.ndarray | None = None) -> np.ndarray:
        """``n`` outputs of this decoder: decoded encodings of ``n`` of the ``real`` images (drawn
        for ``seed``), exactly what the decoder makes from a latent."""
        if real is None or not len(real):
            raise ValueError("the autoencoder family makes its own items from real images: give real images")
        check_sample_shape(real, self.output_shape, "real image")
        order = np.random.default_rng(seed).permutation(len(real))[:n]
        self._module.to(resolve_device(self.device))
        return self._module.reconstruct(real[order])

    def lookalikes(self, real: np.ndarray, seeds: Seeds, steps: int, n: int) -> dict[str, np.ndarray]:
        """What an owner of a latent diffusion model meets, built from the autoencoder and the
        ``real`` images alone, each as ``n`` decoded encodings of real images: an autoencoder of
        the same configuration trained ``steps`` batches from another seed, and this autoencoder
        with its decoder fine-tuned ``steps`` batches (as Stable Diffusion's ft-EMA/ft-MSE decoders
        differ from the original)."""
        if steps <= 0 or len(real) < 2:
            return {}
        seed = seeds.challengers
        rng = np.random.default_rng(seed)
        held = real[rng.permutation(len(real))[:n]]
        vae = self._module.vae
        other = copy.deepcopy(vae)
        torch.manual_seed(seed)
        for module in other.modules():
            if hasattr(module, "reset_parameters") and module is not other:
                module.reset_parameters()
        batch = self.settings.lookalike_batch
        with stage("train the other-seed autoencoder", steps, "batches"):
            train_autoencoder(other, real, steps, batch, seed, parameters=None)
        tuned = copy.deepcopy(vae)
        with stage("fine-tune the decoder", steps, "batches"):
            train_autoencoder(tuned, real, steps, batch, seed + 1,
                               parameters=[*tuned.decoder.parameters(), *tuned.post_quant_conv.parameters()], lr=1e-4)
        return {"lookalike_other-seed-autoencoder": AutoencoderGenerator(other).reconstruct(held),
                "lookalike_finetuned-decoder": AutoencoderGenerator(tuned).reconstruct(held)}

    def _validation(self, generated: np.ndarray | None, real: np.ndarray | None,
                    validation: np.ndarray | None) -> np.ndarray:
        """Held-out own items: ``validation``, else the owner's ``generated`` images, else decoded real images."""
        if validation is not None:
            return validation
        if generated is not None and len(generated):
            return generated[: self.n_validation]
        return self.own_samples(self.n_validation, Seeds(self.seed).validation, real)

    def _conditions(self, validation: np.ndarray) -> dict[str, np.ndarray]:
        subset = validation[: self.settings.n_perturbed]
        return {name: perturb(subset, name) for name in self.settings.perturbations}

    def calibrated_jpeg_quality(self) -> float | None:
        self._check_fitted()
        qualities = [PERTURBATIONS[name][1] for name in self.condition_scores_ if PERTURBATIONS[name][0] == "jpeg"]
        return float(min(qualities)) if qualities else None

    def fit_summary(self) -> dict[str, float]:
        return {f"{self.kind}_validation_median": float(self.validation_scores_.median()),
                **{f"{self.kind}_unaltered_threshold_fnr{f:g}": t for f, t in self._unaltered_thresholds().items()}}

    def _unaltered_thresholds(self) -> dict[float, float]:
        """Per FNR target, the anomaly threshold of the unaltered held-out own items alone (their
        scores are exact: nothing stops early at fit), for items known to carry no lossy history."""
        self._check_fitted()
        return {f: float(torch.quantile(self.validation_scores_, 1 - f)) for f in self.fnr}

    def _as_lossless(self, scores: Scores) -> Scores:
        """``scores`` judged as lossless items: against the unaltered own items' thresholds, with
        those that cover the re-saved ones as ``resaved_thresholds`` (between the two: undecided)."""
        unaltered = {f: self._to_score(t) for f, t in self._unaltered_thresholds().items()}
        attributed = None if scores.attributed is None else self._as_lossless(scores.attributed)
        return replace(scores, thresholds=unaltered, family_thresholds={self.kind: unaltered},
                       resaved_thresholds=self.thresholds, attributed=attributed)

    def _config(self) -> dict[str, Any]:
        return {"generator_sha256": weights_fingerprint(self._module), "fnr": list(self.fnr),
                "n_validation": self.n_validation, "settings": asdict(self.settings), "seed": self.seed,
                "perturbations": list(self.condition_scores_)}

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"validation_scores": self.validation_scores_,
                **{f"condition.{name}": s for name, s in self.condition_scores_.items()}}

    def save(self, path: str | Path) -> Path:
        """Write ``config.json`` and ``tensors.safetensors`` into the folder ``path`` (no pickles)."""
        self._check_fitted()
        return write_saved(path, self.kind, self._config(), self._tensors())

    @classmethod
    def load(cls, path: str | Path, module: nn.Module, device: str = "auto", latent_shape: Sequence[int] | None = None):
        """The detector saved by :meth:`save` for the same decoder (checked by weight hash)."""
        config, tensors = read_saved(path, cls.kind)
        saved = {**cls.SAVED_BEFORE, **config["settings"]}
        settings = cls.Settings(**{**saved, "perturbations": tuple(saved["perturbations"])})
        det = cls(module, config["fnr"], config["n_validation"], settings, device, config["seed"], progress=False)
        check_generator(path, config["generator_sha256"], weights_fingerprint(det._module))
        det._prepare()
        det._calibrate(tensors["validation_scores"], {name: tensors[f"condition.{name}"] for name in config["perturbations"]})
        det._restore(config, tensors)
        return det

    def _prepare(self) -> None:
        self._module.to(resolve_device(self.device)).eval()

    def _restore(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Learned state beyond the thresholds, from a saved config and tensors."""


def train_autoencoder(vae: nn.Module, real: np.ndarray, steps: int, batch: int, seed: int,
                       parameters: list[nn.Parameter] | None, lr: float = 1e-3) -> None:
    """``steps`` Adam steps of ``vae`` (all its weights, or ``parameters``) on ``real`` images:
    L1 reconstruction of a posterior sample plus a small KL term, as latent-diffusion VAEs train
    (without their perceptual and adversarial terms)."""
    device = next(vae.parameters()).device
    rng = np.random.default_rng(seed)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    trained = list(vae.parameters()) if parameters is None else parameters
    for p in vae.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(trained, lr=lr)
    vae.train()
    for _ in range(steps):
        x = to_output_range(real[rng.integers(len(real), size=batch)], *OUTPUT_RANGE).to(device)
        posterior = vae.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
        z = posterior.mean + posterior.std * noise
        loss = (vae.decode(z).sample - x).abs().mean() + 1e-6 * posterior.kl().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        report(1)
    for p in vae.parameters():
        p.requires_grad_(False)
    vae.eval()


@register_kind
class AutoencoderDetector(_AutoencoderFamily):
    """Attribution to an autoencoder's decoder by the residual of a short decoder-input search
    started from the encoder's posterior mean (:class:`DecoderSearch`), in JPEG's quantisation
    steps, calibrated on held-out own items pristine and re-saved. The default for
    ``diffusers:FOLDER`` generators."""

    kind = "autoencoder"
    Settings = AutoencoderSettings
    # the search was Gauss-Newton steps alone, then encoder steps before those, then corrector steps
    SAVED_BEFORE = {"corrector_steps": 0, "encoder_steps": 0, "switch": False, "anderson": False}
    description = "decoder-input search from the encoder's posterior mean (diffusers AutoencoderKL decoders)"
    diagnostics = {"decoder_loss": "the residual the decoder search reached (in JPEG's quantisation steps)",
                   "decoder_passes": "decoder-pass equivalents the decoder search spent on the item",
                   "encoder_passes": "encoder passes the decoder search spent on the item"}

    def _search(self) -> DecoderSearch:
        return DecoderSearch(self._module, self.settings.steps, self.settings.cg_steps,
                             encoder_steps=self.settings.encoder_steps, switch=self.settings.switch,
                             anderson=self.settings.anderson, corrector=getattr(self, "corrector_", None),
                             corrector_steps=self.settings.corrector_steps)

    def _fit_corrector(self, items: np.ndarray) -> None:
        """The search's linear corrector, fitted around the encodings of the held-out own ``items``
        under the re-saves the thresholds cover (:func:`~flipad.inversion.corrector.fit_corrector`);
        none without corrector steps."""
        self.corrector_ = None
        if not self.settings.corrector_steps:
            return
        module = self._module
        device = next(module.parameters()).device
        with torch.no_grad():
            latents = torch.cat([module.encode(to_output_range(items[part], *OUTPUT_RANGE).to(device))
                                 for part in module.batches(len(items))])
        with stage("fit the decoder search's linear corrector", unit="items"):
            self.corrector_ = fit_corrector(module, latents, OUTPUT_RANGE, self.settings.perturbations, module.batches,
                                            seed=Seeds(self.seed).train, progress=report)

    def fit(self, generated: np.ndarray | None = None, real: np.ndarray | None = None,
            negatives: Sequence[np.ndarray] | np.ndarray | None = None, validation: np.ndarray | None = None,
            stages: Stages = INLINE) -> AutoencoderDetector:
        """Set the thresholds and the early exits from held-out own items (``validation``, else the
        owner's ``generated`` images, else decoded ``real`` images), pristine and after each
        re-save of the settings. Returns self.

        The pristine items are searched to their ends (their quantiles are the unaltered items'
        thresholds); a re-saved item stops once its residual is within the largest quantile found
        so far (:func:`~flipad.detectors.calibration.search_resaves`), which sets every threshold
        as searching it to its end would."""
        self._prepare()
        validation = self._validation(generated, real, validation)
        self._fit_corrector(validation)
        search = self._search()
        pristine = stages.run(search, validation, "own (validation)")
        conditions, _, _ = search_resaves(
            lambda name, items, level: stages.run(search.with_exits(Exits(accept=level)), items,
                                                  f"own (validation, {name})"),
            validation[: self.settings.n_perturbed], self.settings.perturbations, self.fnr,
            accept=lowest_quantile(pristine[:, -1], self.fnr))
        self._calibrate(pristine[:, -1], {name: t[:, -1] for name, t in conditions.items()})
        thresholds = self.thresholds_.values()
        self.exits_, self.screens_cut_held_out_ = Exits.checked([pristine, *conditions.values()],
                                                                threshold=max(thresholds), accept=min(thresholds))
        return self

    def _anomaly(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        return self._search().with_exits(self.exits_).run(samples)[:, -1]

    def score(self, samples: np.ndarray | torch.Tensor, stages: Stages = INLINE, exhaustive: bool = False) -> Scores:
        """The verdict with the residual and the search's cost per item; by default each item's
        search stops once its verdict is settled, ``exhaustive`` runs every step (the exact
        residual, for evaluation) and reports what the default says as ``attributed``."""
        self._check_fitted()
        return self._scores(samples, stages, exhaustive, self.exits_)

    def score_lossless(self, samples: np.ndarray | torch.Tensor, stages: Stages = INLINE,
                       exhaustive: bool = False) -> Scores:
        """:meth:`score` for items with no lossy history, against the unaltered own items'
        thresholds: an item is accepted early only below those, and is undecided between them and
        the thresholds that cover re-saved own items (the screens, set on the latter, still reject)."""
        self._check_fitted()
        exits = Exits(accept=min(self._unaltered_thresholds().values()), screen=self.exits_.screen)
        return self._as_lossless(self._scores(samples, stages, exhaustive, exits))

    def _scores(self, samples: np.ndarray | torch.Tensor, stages: Stages, exhaustive: bool, exits: Exits) -> Scores:
        search = self._search() if exhaustive else self._search().with_exits(exits)
        trajectories = stages.run(search, samples, "score")
        unknown = torch.full((len(trajectories),), math.nan)  # the passes of a cached stage
        passes = {"decoder_passes": getattr(search, "passes_", unknown),
                  "encoder_passes": getattr(search, "encoder_passes_", unknown)}
        scores = self._loss_scores(trajectories[:, -1], passes)
        if exhaustive:
            scores = replace(scores, attributed=self._loss_scores(exits.settle(trajectories), passes))
        return scores

    def _loss_scores(self, losses: torch.Tensor, passes: dict[str, torch.Tensor]) -> Scores:
        return self._verdict_scores(losses, {"decoder_loss": losses.double().numpy(),
                                             **{name: p.double().numpy() for name, p in passes.items()}})

    def fit_summary(self) -> dict[str, float]:
        """With the thresholds: the share of own calibration items the early exits' screens cut
        when set on the other half of them (:meth:`Exits.held_out_cuts`; absent for detectors
        saved before it was measured)."""
        cuts = getattr(self, "screens_cut_held_out_", None)
        return {**super().fit_summary(), **({} if cuts is None else {f"{self.kind}_screens_cut_held_out": cuts})}

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "exits": {**asdict(self.exits_), "columns": SCREEN_COLUMNS},
                "screens_cut_held_out": self.screens_cut_held_out_}

    def _tensors(self) -> dict[str, torch.Tensor]:
        corrector = {} if self.corrector_ is None else self.corrector_.state()
        return {**super()._tensors(), **{f"corrector.{name}": t for name, t in corrector.items()}}

    def _restore(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """The corrector and the early exits; a detector saved with the switch before its screens
        were set by phase keeps its accept level and loses its screens (set on another layout, they
        could cut an own item; they only saved time)."""
        corrector = {name.removeprefix("corrector."): t for name, t in tensors.items() if name.startswith("corrector.")}
        self.corrector_ = LinearCorrector.from_state(corrector) if corrector else None
        exits = config["exits"]
        kept = exits.get("columns") == SCREEN_COLUMNS or not self.settings.switch
        self.exits_ = Exits(exits["accept"], tuple(exits["screen"]) if kept else ())
        self.screens_cut_held_out_ = config.get("screens_cut_held_out") if kept else None


class AedrRatio:
    """The ``aedr`` family's stage: ``MSE(x, x1) / MSE(x1, x2)`` per item, ``x1 = D(E(x))`` and
    ``x2 = D(E(x1))`` by the posterior mean (deterministic): two encoder and two decoder passes."""

    name = "aedr-ratio"

    def __init__(self, module: AutoencoderGenerator):
        self.module = module

    @property
    def device(self) -> str:
        return next(self.module.parameters()).device.type

    def fingerprint(self) -> str:
        return hashlib.sha256(f"aedr\0{weights_fingerprint(self.module)}\0{self.device}".encode()).hexdigest()

    @torch.no_grad()
    def run(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        check_sample_shape(samples, self.module.image_shape)
        x = to_output_range(samples, *OUTPUT_RANGE)
        device = next(self.module.parameters()).device
        out = torch.empty(len(x), dtype=torch.float64)
        for part in self.module.batches(len(x)):
            batch = x[part].to(device)
            first = self.module(self.module.encode(batch))
            second = self.module(self.module.encode(first))
            error = ((batch - first) ** 2).flatten(1).mean(1).double()
            out[part] = (error / ((first - second) ** 2).flatten(1).mean(1).double().clamp_min(1e-12)).cpu()
        return out


@register_kind
class AedrDetector(_AutoencoderFamily):
    """AEDR's training-free double-reconstruction ratio (Wang et al., AAAI 2026), with thresholds
    set on held-out own items pristine and re-saved: a cheap screen (two encoder and two decoder
    passes per item) to compare with the ``autoencoder`` kind."""

    kind = "aedr"
    Settings = AedrSettings
    description = "AEDR's double-reconstruction ratio MSE(x, D(E(x))) / MSE(D(E(x)), D(E(D(E(x))))) (autoencoders)"
    diagnostics = {"aedr_ratio": "MSE(x, x1) / MSE(x1, x2) with x1 = D(E(x)), x2 = D(E(x1))"}

    def fit(self, generated: np.ndarray | None = None, real: np.ndarray | None = None,
            negatives: Sequence[np.ndarray] | np.ndarray | None = None, validation: np.ndarray | None = None,
            stages: Stages = INLINE) -> AedrDetector:
        """Thresholds from held-out own items, pristine and re-saved. Returns self."""
        self._prepare()
        validation = self._validation(generated, real, validation)
        ratio = AedrRatio(self._module)
        pristine = stages.run(ratio, validation, "own (validation)")
        conditions = {name: stages.run(ratio, items, f"own (validation, {name})")
                      for name, items in self._conditions(validation).items()}
        self._calibrate(pristine, conditions)
        return self

    def _anomaly(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        return AedrRatio(self._module).run(samples)

    def score(self, samples: np.ndarray | torch.Tensor, stages: Stages = INLINE, exhaustive: bool = False) -> Scores:
        self._check_fitted()
        ratio = stages.run(AedrRatio(self._module), samples, "score")
        return self._verdict_scores(ratio, {"aedr_ratio": ratio.double().numpy()})

    def score_lossless(self, samples: np.ndarray | torch.Tensor, stages: Stages = INLINE,
                       exhaustive: bool = False) -> Scores:
        """:meth:`score` against the unaltered own items' thresholds (undecided up to the re-saved ones')."""
        return self._as_lossless(self.score(samples, stages, exhaustive))
