"""How far an item lies from a generator output: the reconstruction family's loss.

``mse`` is the pixel MSE in the generator's output range. ``jpeg`` measures the residual as JPEG
sees it: in 8x8 blocks, each DCT coefficient (in 8-bit steps) divided by the step the JPEG
standard's example tables (Annex K; luminance, and chrominance for the Cb/Cr of a 3-channel
image) quantise it with, then squared and averaged. A JPEG re-save changes each coefficient by at
most half its step, at every quality, by the same table scaled, so a recompressed copy of a
generator output stays close in this metric, while what the generator cannot make (a real image,
another generator's output) differs from the closest output it can make in the finely quantised
low frequencies, which this metric weighs most. Measured on the core-bar generators
(docs/benchmarks.md): at the same own-sample FNR, with JPEG q70 copies in the calibration, the
MSE let 1-5% of real images through and ``jpeg`` none of 1,000.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["METRICS", "ResidualMetric"]

METRICS = ("jpeg", "mse")
BLOCK = 8
# ITU-T T.81 Annex K, tables K.1 (luminance) and K.2 (chrominance)
LUMINANCE = (
    (16, 11, 10, 16, 24, 40, 51, 61), (12, 12, 14, 19, 26, 58, 60, 55), (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62), (18, 22, 37, 56, 68, 109, 103, 77), (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101), (72, 92, 95, 98, 112, 100, 103, 99),
)
CHROMINANCE = (
    (17, 18, 24, 47, 99, 99, 99, 99), (18, 21, 26, 66, 99, 99, 99, 99), (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99), *((99,) * 8,) * 4,
)
# JFIF's RGB -> YCbCr (the offsets cancel in a residual)
YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


def _dct_matrix() -> torch.Tensor:
    k = torch.arange(BLOCK, dtype=torch.float64)
    basis = torch.cos(math.pi * (2 * k[None] + 1) * k[:, None] / (2 * BLOCK)) * math.sqrt(2 / BLOCK)
    basis[0] /= math.sqrt(2)
    return basis  # orthonormal: basis @ basis.T == I


class ResidualMetric:
    """``metric(residual)``: the loss per item of residuals ``(n, *output_shape)`` (or flattened
    ``(n, numel)``) in the output range ``output_range``; ``name`` is one of :data:`METRICS`.
    ``floor`` is the metric's expected value for an 8-bit copy of a generator output (rounding
    error, uniform in half a step per pixel)."""

    def __init__(self, name: str, output_shape: Sequence[int], output_range: tuple[float, float]):
        if name not in METRICS:
            raise ValueError(f"unknown reconstruction metric {name!r}; use one of {', '.join(METRICS)}")
        self.name = name
        self.output_shape = tuple(output_shape)
        low, high = output_range
        self.step = (high - low) / 255
        if name == "jpeg":
            if len(self.output_shape) != 3:
                raise ValueError(f"the jpeg metric needs (C, H, W) images, got output shape {self.output_shape}; use metric 'mse'")
            channels = self.output_shape[0]
            mix = torch.tensor(YCBCR, dtype=torch.float64) if channels == 3 else torch.eye(channels, dtype=torch.float64)
            tables = [LUMINANCE] + [CHROMINANCE] * 2 if channels == 3 else [LUMINANCE] * channels
            self._mix = mix
            self._weights = 1 / torch.tensor(tables, dtype=torch.float64)  # (C, 8, 8)
            self._dct = _dct_matrix()
            # white rounding noise of variance 1/12 (in steps) per pixel stays white under the
            # orthonormal DCT; the channel mix scales each output channel's variance
            self.floor = float((mix**2).sum(1) @ (self._weights**2).mean((1, 2))) / 12 / channels
        else:
            self.floor = self.step**2 / 12

    def __call__(self, residual: torch.Tensor) -> torch.Tensor:
        return (self.whiten(residual) ** 2).mean(1)

    def whiten(self, residual: torch.Tensor) -> torch.Tensor:
        """The linear map ``W`` of residuals ``(n, *output_shape)`` (or flattened) to ``(n, k)`` whose
        mean square is the metric: the residuals themselves for ``mse``; for ``jpeg`` each block's
        weighted DCT coefficients (scaled so the mean over them is the metric). A least-squares
        search of ``W (G(z) - x)`` minimises the metric itself."""
        n = len(residual)
        if self.name == "mse":
            return residual.reshape(n, -1)
        x = residual.reshape(n, *self.output_shape) / self.step
        dtype, device = x.dtype, x.device
        channels, height, width = self.output_shape
        if channels == 3:
            x = torch.einsum("dc,nchw->ndhw", self._mix.to(device, dtype), x)
        x = F.pad(x, (0, -width % BLOCK, 0, -height % BLOCK))  # the padding holds no residual
        blocks = x.unflatten(2, (-1, BLOCK)).unflatten(4, (-1, BLOCK))  # n, c, by, u, bx, v
        dct = self._dct.to(device, dtype)
        coefficients = torch.einsum("iu,ncyuxv,jv->ncyxij", dct, blocks, dct)
        weighted = (coefficients * self._weights.to(device, dtype)[:, None, None]).flatten(1)
        return weighted * math.sqrt(weighted.shape[1] / (channels * height * width))

    def whiten_columns(self, jacobians: torch.Tensor) -> torch.Tensor:
        """:meth:`whiten` of each column of ``(n, out_dim, k)`` Jacobians: ``(n, whitened_dim, k)``."""
        n, out_dim, k = jacobians.shape
        columns = self.whiten(jacobians.transpose(1, 2).reshape(n * k, out_dim))
        return columns.view(n, k, -1).transpose(1, 2)
