"""A linear corrector for decoders whose latent is a downsampled image (an autoencoder's): pixel
residuals to latent steps, so a search on the decoder input can step without an encoder pass.

The step ``z += C (x - D(z))`` with ``C`` a strided convolution (``kernel`` pixels wide, the
decoder's downsampling ``stride`` apart) fitted by least squares to the decoder's own responses:
around latents ``z`` of items it made, random latent moves ``d`` and the pixel changes they cause,
``quantise(D(z + d))`` re-saved as the thresholds' re-saves are, minus ``D(z)``. ``C`` is the linear
estimate of ``d`` from that change: an approximate pseudo-inverse of the decoder's Jacobian that
ignores what a re-save adds (the change from a JPEG is noise to it, not a move to undo). It costs a
small fraction of a decoder pass (:attr:`LinearCorrector.share`). See docs/design.md, "A linear
corrector".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..io.data import quantize, to_output_range
from ..io.perturb import perturb

KERNEL_STRIDES = 3  # the kernel's width in latent cells: a latent cell's pixels and half a cell around them
MOVE_SCALE = 0.1  # the random latent moves' size, over the latents' standard deviation
ROWS = 2**15  # least-squares rows (latent cells) the fit gathers: ten times the unknowns per latent channel
RIDGE = 1e-3  # Tikhonov damping, over the normal matrix's mean diagonal


@dataclass(frozen=True)
class LinearCorrector:
    """``C``: a pixel residual ``(n, channels, H, W)`` to a latent step ``(n, latent_channels, H/s,
    W/s)`` (:meth:`__call__`); ``share``: its FLOPs over one decoder pass's, counted at the fit."""

    weight: torch.Tensor  # (latent_channels, channels, kernel, kernel)
    stride: int
    share: float

    def __call__(self, residual: torch.Tensor) -> torch.Tensor:
        kernel = self.weight.shape[-1]
        return F.conv2d(residual, self.weight.to(residual), stride=self.stride, padding=(kernel - self.stride) // 2)

    def state(self) -> dict[str, torch.Tensor]:
        """What :meth:`from_state` restores it from."""
        return {"weight": self.weight, "stride_share": torch.tensor([self.stride, self.share], dtype=torch.float64)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> LinearCorrector:
        stride, share = state["stride_share"].tolist()
        return cls(state["weight"].float(), int(stride), float(share))


def fit_corrector(decoder: nn.Module, latents: torch.Tensor, output_range: tuple[float, float],
                  resaves: Sequence[str], batches: Callable[[int], list[slice]], seed: int = 0,
                  progress: Callable[[int], None] = lambda n: None) -> LinearCorrector:
    """The corrector of ``decoder`` (latents ``(n, c, h, w)`` to images in ``output_range``, each
    side ``stride`` times the latent's), fitted around ``latents`` (encodings of items it made):
    ``ROWS`` latent cells, the items cycled with fresh moves until reached, each batch of items
    (``batches(n)``) unaltered or under one of the ``resaves`` (perturbation names) in turn.
    ``progress(k)``: ``k`` more items done."""
    device = latents.device
    with torch.no_grad():
        sample = decoder(latents[:1])
    channels, stride = sample.shape[1], _stride(sample.shape[-1], latents.shape[-1])
    kernel = KERNEL_STRIDES * stride
    features = channels * kernel * kernel
    normal = torch.zeros(features, features, dtype=torch.float64, device=device)
    moved_to = torch.zeros(features, latents.shape[1], dtype=torch.float64, device=device)
    scale = MOVE_SCALE * float(latents.std())
    generator = torch.Generator(device=device).manual_seed(seed)
    conditions = [None, *resaves]
    rows, turn = 0, 0
    with torch.no_grad():
        base = {}
        while rows < ROWS:
            for part in batches(len(latents)):
                z = latents[part]
                if part.start not in base:
                    base[part.start] = decoder(z)
                move = scale * torch.randn(z.shape, generator=generator, device=device)
                changed = quantize(decoder(z + move), *output_range)
                if conditions[turn % len(conditions)] is not None:
                    changed = perturb(changed, conditions[turn % len(conditions)])
                turn += 1
                residual = to_output_range(changed, *output_range).to(device) - base[part.start]
                x = F.unfold(residual, kernel, padding=(kernel - stride) // 2, stride=stride)
                x = x.transpose(1, 2).reshape(-1, features).double()
                y = move.flatten(2).transpose(1, 2).reshape(-1, latents.shape[1]).double()
                normal += x.T @ x
                moved_to += x.T @ y
                rows += len(x)
                progress(len(z))
                if rows >= ROWS:
                    break
    normal += RIDGE * normal.diagonal().mean() * torch.eye(features, dtype=normal.dtype, device=device)
    weight = torch.linalg.solve(normal, moved_to).T.reshape(latents.shape[1], channels, kernel, kernel)
    corrector = LinearCorrector(weight.float().cpu(), stride, 0.0)
    share = _flops(lambda: corrector(sample.cpu())) / _flops(lambda: decoder(latents[:1]))
    return replace(corrector, share=share)


def _stride(image_side: int, latent_side: int) -> int:
    if image_side % latent_side:
        raise ValueError(f"a linear corrector needs an image side a multiple of the latent's, got {image_side} "
                         f"and {latent_side}")
    return image_side // latent_side


def _flops(run: Callable[[], object]) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())
