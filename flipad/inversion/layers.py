"""The generator's final linear layer as an operator ``A`` with its adjoint ``A^T``.

``A`` is the layer without its bias, so ``layer(z) = A z + b``. The lasso solver
only needs ``A``, ``A^T``, ``b`` and the largest eigenvalue of ``A^T A``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LinearMap", "SUPPORTED_LAYERS", "power_iteration"]

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)


def power_iteration(
    forward, adjoint, input_shape: Sequence[int], device: torch.device, iters: int = 100, seed: int = 0
) -> float:
    """Estimate the largest eigenvalue of ``A^T A`` by power iteration (returned with a 1% safety margin)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(1, *input_shape, generator=gen).to(device)
    v /= v.norm()
    eig = 0.0
    for _ in range(iters):
        w = adjoint(forward(v))
        new = float((w * v).sum())
        v = w / w.norm().clamp_min(1e-30)
        if abs(new - eig) <= 1e-6 * abs(new):
            eig = new
            break
        eig = new
    return eig * 1.01


class LinearMap:
    """The bias-free part ``A`` of a Linear, Conv2d or ConvTranspose2d layer.

    ``input_shape``/``output_shape`` exclude the batch dimension. ``lipschitz``
    (the largest eigenvalue of ``A^T A``) is computed once and cached.
    """

    def __init__(self, layer: nn.Module, input_shape: Sequence[int], output_shape: Sequence[int]):
        if not isinstance(layer, SUPPORTED_LAYERS):
            raise TypeError(
                f"the final layer is a {type(layer).__name__}; FLIPAD inverts Linear, Conv2d and ConvTranspose2d"
            )
        self.layer = layer
        self.input_shape = tuple(int(s) for s in input_shape)
        self.output_shape = tuple(int(s) for s in output_shape)
        self._lipschitz: dict[torch.device, float] = {}
        self._explicit = self._has_explicit_adjoint(layer)

    @staticmethod
    def _has_explicit_adjoint(layer: nn.Module) -> bool:
        if isinstance(layer, nn.Linear):
            return True
        return layer.padding_mode == "zeros" and not isinstance(layer.padding, str)

    @property
    def num_inputs(self) -> int:
        return math.prod(self.input_shape)

    @property
    def num_outputs(self) -> int:
        return math.prod(self.output_shape)

    def _weight(self, like: torch.Tensor) -> torch.Tensor:
        return self.layer.weight.detach().to(device=like.device, dtype=like.dtype)

    def bias_map(self, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The bias ``b`` broadcast to the output shape (zeros when the layer has no bias)."""
        out = torch.zeros(self.output_shape, device=device, dtype=dtype)
        bias = self.layer.bias
        if bias is None:
            return out
        bias = bias.detach().to(device=device, dtype=dtype)
        return out + (bias if isinstance(self.layer, nn.Linear) else bias.view(-1, 1, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``A z`` for a batch ``z`` of shape (N, *input_shape)."""
        layer, w = self.layer, self._weight(z)
        if isinstance(layer, nn.Linear):
            return z @ w.T
        if not self._explicit:
            return self._bias_free_call(z)
        if isinstance(layer, nn.Conv2d):
            return F.conv2d(z, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        return F.conv_transpose2d(
            z, w, None, layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation
        )

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T y`` for a batch ``y`` of shape (N, *output_shape)."""
        layer, w = self.layer, self._weight(y)
        if isinstance(layer, nn.Linear):
            return y @ w
        if not self._explicit:
            return self._autograd_adjoint(y)
        if isinstance(layer, nn.Conv2d):
            return F.conv_transpose2d(
                y, w, None, layer.stride, layer.padding, self._output_padding(), layer.groups, layer.dilation
            )
        return F.conv2d(y, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)

    def _output_padding(self) -> tuple[int, int]:
        # With stride > 1 several input sizes give the same conv output size; output_padding
        # makes the transposed conv return the conv's actual input size (trailing rows included).
        layer, (h, w) = self.layer, self.input_shape[-2:]
        sizes = []
        for size, out, s, p, d, k in zip(
            (h, w), self.output_shape[-2:], layer.stride, layer.padding, layer.dilation, layer.kernel_size
        ):
            sizes.append(size - ((out - 1) * s - 2 * p + d * (k - 1) + 1))
        return tuple(sizes)

    def _bias_free_call(self, z: torch.Tensor) -> torch.Tensor:
        return self.layer(z) - self.bias_map(z.device, z.dtype)

    def _autograd_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        z = torch.zeros(y.shape[0], *self.input_shape, device=y.device, dtype=y.dtype, requires_grad=True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self._bias_free_call(z), z, grad_outputs=y)
        return grad

    def lipschitz(self, device: torch.device) -> float:
        """Largest eigenvalue of ``A^T A`` (the gradient's Lipschitz constant), cached per device."""
        if device not in self._lipschitz:
            with torch.no_grad():
                self._lipschitz[device] = power_iteration(self.forward, self.adjoint, self.input_shape, device)
        return self._lipschitz[device]

    def gram_matrix(self, device: torch.device, chunk: int = 1024) -> torch.Tensor:
        """The dense ``A A^T`` (outputs x outputs), built column block by column block."""
        m = self.num_outputs
        gram = torch.empty(m, m, device=device, dtype=torch.float64)
        with torch.no_grad():
            for start in range(0, m, chunk):
                stop = min(m, start + chunk)
                basis = torch.zeros(stop - start, m, device=device)
                basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
                cols = self.forward(self.adjoint(basis.view(-1, *self.output_shape)))
                gram[:, start:stop] = cols.reshape(stop - start, m).T.double()
        return (gram + gram.T) / 2
