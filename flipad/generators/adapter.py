"""``GeneratorAdapter``: one generic wrapper around any white-box generator.

It traces the module once to find the final linear layer and the invertible
output activation, samples latents, draws (8-bit quantised) samples, captures
penultimate activations, holds the mean-activation anchor and inverts samples
through the final layer.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..device import resolve_device
from ..inversion.lasso import Constraints, InversionResult, LassoOptions, solve_lasso
from ..inversion.layers import LinearMap
from ..io.data import check_sample_shape
from .activations import OutputActivation
from .folding import fold_upsampling
from .sampling import generate_samples, resolve_latent_shape, sample_latents
from .tracing import trace_generator

__all__ = ["GeneratorAdapter"]

logger = logging.getLogger(__name__)


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over the module's state dict (names, shapes, dtypes and bytes), in a stable order; a
    module whose outputs depend on part of its weights only (an autoencoder's decoder) names that
    part with a ``fingerprint_state()`` method, so two models sharing it are one generator."""
    digest = hashlib.sha256()
    state = module.fingerprint_state() if hasattr(module, "fingerprint_state") else module.state_dict()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return digest.hexdigest()


class GeneratorAdapter:
    """A generator, its final layer ``x = s(A z + b)`` and its anchor ``z_bar``.

    Build it with :meth:`from_module`. The module is kept in eval mode (the mode it
    generates in), on ``device``.
    """

    def __init__(
        self,
        module: nn.Module,
        latent_shape: Sequence[int],
        final_layer_name: str,
        final_layer: nn.Module,
        activation: OutputActivation,
        penultimate_shape: Sequence[int],
        output_shape: Sequence[int],
        penultimate_bounds: tuple[float | None, float | None] = (None, None),
        device: str | torch.device = "auto",
        anchor_samples: int = 5000,
        seed: int = 0,
        batch_size: int = 500,
        capture: nn.Module | None = None,
    ):
        self.device = resolve_device(device)
        self.module = module.to(self.device).eval()
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.final_layer_name = final_layer_name
        self.activation = activation
        self.penultimate_shape = tuple(penultimate_shape)
        self.output_shape = tuple(output_shape)
        self.penultimate_bounds = penultimate_bounds
        self.linear_map = LinearMap(final_layer, self.penultimate_shape, self.output_shape)
        self.anchor_samples = anchor_samples
        self.seed = seed
        self.batch_size = batch_size
        self.capture = capture if capture is not None else final_layer  # its input is the penultimate activation
        self._anchor: torch.Tensor | None = None
        self._fingerprint: str | None = None
        self._folded: GeneratorAdapter | None = None

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        latent_shape: Sequence[int] | None = None,
        final_layer: str | nn.Module | None = None,
        activation: str | None = None,
        device: str | torch.device = "auto",
        anchor_samples: int = 5000,
        seed: int = 0,
    ) -> GeneratorAdapter:
        """Trace ``module`` and wrap it.

        ``latent_shape`` defaults to the module's ``latent_shape`` attribute. ``final_layer``
        (a submodule or its dotted name) and ``activation`` ("tanh", "sigmoid", "identity")
        override what tracing finds. Raises ``NotInvertibleError`` naming the cause for
        generators FLIPAD cannot invert.
        """
        latent_shape = resolve_latent_shape(module, latent_shape)
        dev = resolve_device(device)
        module = module.to(dev).eval()
        probe = torch.randn(2, *latent_shape, generator=torch.Generator().manual_seed(seed)).to(dev)
        trace = trace_generator(module, probe, final_layer=final_layer, activation=activation)
        logger.info(
            "final layer %s (%s) + %s; penultimate %s -> output %s",
            trace.final_layer_name,
            type(trace.final_layer).__name__,
            trace.activation.name,
            trace.penultimate_shape,
            trace.output_shape,
        )
        return cls(
            module,
            latent_shape,
            trace.final_layer_name,
            trace.final_layer,
            trace.activation,
            trace.penultimate_shape,
            trace.output_shape,
            trace.penultimate_bounds,
            device=dev,
            anchor_samples=anchor_samples,
            seed=seed,
        )

    # -- sampling ---------------------------------------------------------------------------

    @property
    def is_image(self) -> bool:
        """Whether the generator makes images (C, H, W) rather than table rows (D,)."""
        return len(self.output_shape) == 3

    @property
    def fingerprint(self) -> str:
        """sha256 of the generator's weights."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.module)
        return self._fingerprint

    def sample_latents(self, n: int, seed: int) -> torch.Tensor:
        """``n`` standard-normal latents of ``latent_shape``, reproducible from ``seed``."""
        return sample_latents(n, self.latent_shape, seed)

    def _run(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}
        hook = self.capture.register_forward_hook(
            lambda m, i, o: captured.__setitem__("z", i[0].detach())
        )
        try:
            with torch.no_grad():
                out = self.module(latents.to(self.device))
        finally:
            hook.remove()
        return captured["z"], out

    def penultimate(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate activations and outputs (float, unquantised) for ``latents``, batched."""
        acts, outs = [], []
        for start in range(0, len(latents), self.batch_size):
            z, out = self._run(latents[start : start + self.batch_size])
            acts.append(z.cpu())
            outs.append(out.cpu())
        return torch.cat(acts), torch.cat(outs)

    def generate(self, n: int, seed: int = 1, quantized: bool = True) -> np.ndarray:
        """Draw ``n`` samples. Images are quantised to uint8 (N, C, H, W) as a PNG would store them;
        tabular rows (and ``quantized=False``) are returned as float32 in the output range."""
        return generate_samples(self.module, self.latent_shape, n, seed, (self.activation.low, self.activation.high),
                                self.device, quantized=quantized)

    def folded(self) -> GeneratorAdapter:
        """This generator with nearest upsampling folded into a stride-1 final ``Conv2d`` (see
        :mod:`flipad.folding`): an adapter whose final layer is the equivalent transposed
        convolution and whose penultimate activation is the map before upsampling. ``self``
        when there is nothing to fold. Built once and kept."""
        if self._folded is None:
            probe = self.sample_latents(2, self.seed).to(self.device)
            fold = fold_upsampling(self.module, probe, self.final_layer_name)
            self._folded = self if fold is None else GeneratorAdapter(
                self.module, self.latent_shape, self.final_layer_name, fold.layer, self.activation, fold.input_shape,
                self.output_shape, self.penultimate_bounds, device=self.device, anchor_samples=self.anchor_samples,
                seed=self.seed, batch_size=self.batch_size, capture=fold.upsample,
            )
        return self._folded

    @property
    def anchor(self) -> torch.Tensor:
        """The mean penultimate activation ``z_bar`` over ``anchor_samples`` latent draws (eval mode)."""
        if self._anchor is None:
            total = torch.zeros(self.penultimate_shape, dtype=torch.float64)
            latents = self.sample_latents(self.anchor_samples, self.seed)
            for start in range(0, self.anchor_samples, self.batch_size):
                z, _ = self._run(latents[start : start + self.batch_size])
                total += z.double().sum(0).cpu()
            self._anchor = (total / self.anchor_samples).float()
        return self._anchor

    def set_anchor(self, anchor: torch.Tensor) -> None:
        """Use a stored anchor (e.g. from a saved detector) instead of recomputing it."""
        if tuple(anchor.shape) != self.penultimate_shape:
            raise ValueError(f"anchor has shape {tuple(anchor.shape)}, expected {self.penultimate_shape}")
        self._anchor = anchor.detach().float().cpu()

    # -- inversion --------------------------------------------------------------------------

    def to_output_range(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Samples as float in the generator's output range, after checking their shape."""
        check_sample_shape(samples, self.output_shape)
        return self.activation.to_range(samples)

    def residual_target(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``s^-1(x) - A z_bar - b``: the lasso's data term target for deviations from the anchor."""
        y = self.activation.inverse(self.to_output_range(samples)).to(self.device)
        anchor = self.anchor.to(self.device)[None]
        with torch.no_grad():
            return y - self.linear_map.forward(anchor) - self.linear_map.bias_map(self.device)

    def constraints(self, samples_in_range: torch.Tensor, bounded: bool, censored: bool) -> tuple[torch.Tensor, Constraints | None]:
        """The lasso target and, if asked, its constraints: the box on ``d`` implied by the module
        before the final layer (``bounded``) and one-sided terms for saturated outputs (``censored``,
        whose targets move to the edge of the end quantisation bin, ``1/510`` of the range inward)."""
        act = self.activation
        if not censored or act.name == "identity":
            target = self.residual_target(samples_in_range)
            below = above = None
        else:
            span = act.high - act.low
            below = (samples_in_range <= act.low + 1e-6 * span).to(self.device)
            above = (samples_in_range >= act.high - 1e-6 * span).to(self.device)
            edge = samples_in_range.clamp(act.low + span / 510, act.high - span / 510)
            target = self.residual_target(edge)
        d_min = d_max = None
        if bounded:
            low, high = self.penultimate_bounds
            anchor = self.anchor.to(self.device)
            d_min = None if low is None else low - anchor
            d_max = None if high is None else high - anchor
        if below is None and d_min is None and d_max is None:
            return target, None
        return target, Constraints(d_min, d_max, below, above)

    def invert(
        self,
        samples: np.ndarray | torch.Tensor,
        alpha: float = 5e-4,
        return_result: bool = False,
        progress: bool = False,
        warn_on_cap: bool = True,
        bounded: bool = False,
        censored: bool = False,
        options: LassoOptions | None = None,
        **settings,
    ) -> torch.Tensor | InversionResult:
        """Recover the penultimate activation ``z_bar + d*`` of each sample.

        ``d*`` solves the anchored lasso ``min 0.5 ||s^-1(x) - A(z_bar + d) - b||^2 + alpha ||d||_1``
        exactly as the paper states it. ``options`` (a :class:`LassoOptions`), or keyword
        ``settings`` of one (tolerance, iteration cap, method, batch size), configure the solver. With ``return_result`` the per-sample
        diagnostics come back too (:class:`InversionResult`). ``bounded`` constrains ``z_bar + d``
        to the range the module before the final layer produces (ReLU: non-negative), ``censored``
        treats saturated outputs as inequalities (see :meth:`constraints`). Samples that hit the iteration cap
        are logged at warning level (``warn_on_cap=False``: at debug level, for callers whose cap
        is a deliberate budget).
        """
        opts = options if options is not None else LassoOptions(**settings)
        samples_t = self.to_output_range(samples)
        batch = opts.batch_for(self.linear_map.num_inputs, self.device)
        results = []
        for start in tqdm(range(0, len(samples_t), batch), desc="invert", disable=not progress):
            target, constraints = self.constraints(samples_t[start : start + batch], bounded, censored)
            results.append(solve_lasso(self.linear_map, target, alpha, opts, constraints))
        result = InversionResult.concat(results, self.anchor)
        if result.hit_cap.any():
            logger.log(
                logging.WARNING if warn_on_cap else logging.DEBUG,
                "%d of %d samples hit the iteration cap (%d) before the stopping rule held",
                int(result.hit_cap.sum()),
                len(result.hit_cap),
                opts.max_iter,
            )
        return result if return_result else result.activations
