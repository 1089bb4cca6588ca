"""Nearest-neighbour upsampling followed by a stride-1 convolution, as one transposed convolution.

Generators such as LSGAN end in ``Conv2d(Upsample(h))``. Both steps are linear, so the final
linear operation of such a generator is their composition, and it equals a ``ConvTranspose2d``
with the upsampling factor as its stride acting on ``h`` itself. Inverting that map recovers the
activation before upsampling: ``s^2`` times fewer unknowns than the upsampled map the paper
inverts, and a solution that respects what upsampling can produce (blocks of equal values).

In one dimension, with scale ``s`` and a kernel ``w`` of size ``k`` and padding ``p``:
``y[i] = sum_a w[a] h[(i - p + a) // s]``. Grouping the taps that read the same ``h[j]`` gives a
transposed convolution with stride ``s``, kernel size ``k + s - 1``, padding ``k - 1 - p`` and
taps ``K[t] = sum of w[a] for a in [p - r, p - r + s)``, ``r = t - (k - 1 - p)``; in two
dimensions the same grouping applies along each axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .tracing import LayerCall, find_final, producer_of, record_calls

__all__ = ["FoldedUpsampling", "fold_upsampling", "folded_kernel_taps"]


@dataclass
class FoldedUpsampling:
    """The transposed convolution equal to ``conv(upsample(h))``, and where ``h`` comes in."""

    layer: nn.ConvTranspose2d
    upsample: nn.Module  # its input is the activation the folded layer inverts
    input_shape: tuple[int, ...]


def folded_kernel_taps(kernel: int, padding: int, scale: int) -> torch.Tensor:
    """The 0/1 matrix ``T`` (``kernel + scale - 1`` x ``kernel``) with ``K = T w`` along one axis."""
    taps = torch.zeros(kernel + scale - 1, kernel)
    shift = kernel - 1 - padding
    for t in range(kernel + scale - 1):
        r = t - shift
        taps[t, max(0, padding - r) : min(kernel, padding - r + scale)] = 1.0
    return taps


def _scales(call: LayerCall) -> tuple[int, int] | None:
    """Integer (height, width) factors of a nearest-neighbour upsampling call, else None."""
    if not isinstance(call.module, nn.Upsample) or call.module.mode != "nearest":
        return None
    (h, w), (oh, ow) = call.inputs[0].shape[-2:], call.output.shape[-2:]
    if oh % h or ow % w:
        return None
    return oh // h, ow // w


def _foldable(conv: nn.Conv2d) -> bool:
    return (
        conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and all(p <= k - 1 for p, k in zip(conv.padding, conv.kernel_size))
    )


def fold_upsampling(module: nn.Module, latents: torch.Tensor, final_layer: str | nn.Module) -> FoldedUpsampling | None:
    """Trace ``module`` on ``latents``; when ``final_layer`` is a stride-1 ``Conv2d`` fed directly by
    nearest-neighbour upsampling with integer factors, return the equivalent transposed
    convolution (bias included). Otherwise None: the final layer is inverted as it is."""
    calls, _ = record_calls(module, latents)
    final = find_final(calls, module, final_layer)
    conv = final.module
    if not isinstance(conv, nn.Conv2d) or not _foldable(conv):
        return None
    producer = producer_of(calls, final.inputs[0], before=final)
    scales = _scales(producer) if producer is not None else None
    if scales is None:
        return None
    (kh, kw), (ph, pw) = conv.kernel_size, conv.padding
    weight = conv.weight.detach()
    rows, cols = folded_kernel_taps(kh, ph, scales[0]), folded_kernel_taps(kw, pw, scales[1])
    kernel = torch.einsum("ia,jb,ocab->coij", rows.to(weight), cols.to(weight), weight)
    layer = nn.ConvTranspose2d(
        conv.in_channels, conv.out_channels, tuple(kernel.shape[-2:]), stride=scales,
        padding=(kh - 1 - ph, kw - 1 - pw), bias=conv.bias is not None,
    ).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(kernel)
        if conv.bias is not None:
            layer.bias.copy_(conv.bias.detach())
    return FoldedUpsampling(layer.eval().requires_grad_(False), producer.module, tuple(producer.inputs[0].shape[1:]))
