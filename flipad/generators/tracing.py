"""Finding a generator's final linear layer and output activation by tracing one forward pass.

Forward hooks record every leaf module call; the final layer is the last
Linear/Conv2d/ConvTranspose2d call, and the output activation is whichever of
tanh, sigmoid or the identity maps that layer's output to the generator's
output exactly. Anything else (a ReLU or clamp at the end, a skip connection
added to the output) is refused with the cause named.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..inversion.layers import SUPPORTED_LAYERS
from .activations import ACTIVATIONS, OutputActivation, get_activation

__all__ = ["TraceResult", "NotInvertibleError", "trace_generator", "record_calls", "producer_of", "find_final", "LayerCall"]

NON_INVERTIBLE = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Hardsigmoid, nn.Softmax, nn.GELU, nn.SiLU, nn.ELU, nn.Threshold)
RANGE_PRESERVING = (nn.Upsample, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity, nn.Flatten, nn.Unflatten)
BOUNDS_OF_PRECEDING = {nn.ReLU: (0.0, None), nn.ReLU6: (0.0, 6.0), nn.Sigmoid: (0.0, 1.0), nn.Tanh: (-1.0, 1.0)}


class NotInvertibleError(ValueError):
    """The generator's output is not ``s(final_linear(z))`` with an invertible elementwise ``s``."""


@dataclass
class TraceResult:
    """What one traced forward pass says about the generator's last two operations."""

    final_layer_name: str
    final_layer: nn.Module
    activation: OutputActivation
    penultimate_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    penultimate_bounds: tuple[float | None, float | None]


@dataclass
class LayerCall:
    """One leaf module call seen while tracing: the module, its inputs and its output."""

    name: str
    module: nn.Module
    inputs: tuple
    output: object


def _same_tensor(a: object, b: object) -> bool:
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.numel() == b.numel()
        and a.data_ptr() == b.data_ptr()  # the same storage, possibly viewed in another shape
    )


def record_calls(module: nn.Module, latents: torch.Tensor) -> tuple[list[LayerCall], torch.Tensor]:
    calls: list[LayerCall] = []
    handles = []
    for name, sub in module.named_modules():
        if list(sub.children()):
            continue
        handles.append(
            sub.register_forward_hook(
                lambda m, i, o, name=name: calls.append(LayerCall(name, m, tuple(i), o))
            )
        )
    try:
        with torch.no_grad():
            out = module(latents)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor):
        raise NotInvertibleError(f"the generator returned {type(out).__name__}, not a tensor of samples")
    return calls, out


def find_final(calls: list[LayerCall], module: nn.Module, final_layer: str | nn.Module | None) -> LayerCall:
    if final_layer is None:
        linear = [c for c in calls if isinstance(c.module, SUPPORTED_LAYERS)]
        if not linear:
            raise NotInvertibleError("no Linear, Conv2d or ConvTranspose2d layer was called by the generator")
        return linear[-1]
    target = module.get_submodule(final_layer) if isinstance(final_layer, str) else final_layer
    matches = [c for c in calls if c.module is target]
    if not matches:
        raise NotInvertibleError(f"the final layer override {final_layer!r} was not called in the forward pass")
    if not isinstance(target, SUPPORTED_LAYERS):
        raise NotInvertibleError(
            f"the final layer override is a {type(target).__name__}; use a Linear, Conv2d or ConvTranspose2d"
        )
    return matches[-1]


def _match_activation(
    pre: torch.Tensor, out: torch.Tensor, calls: list[LayerCall], final: LayerCall, activation: str | None
) -> OutputActivation:
    def fits(act: OutputActivation) -> bool:
        return pre.shape == out.shape and torch.allclose(act.forward(pre), out, rtol=1e-4, atol=1e-5)

    if activation is not None:
        act = get_activation(activation)
        if not fits(act):
            raise NotInvertibleError(
                f"the output is not {act.name}(final layer output): something else happens after "
                f"{final.name!r} (a skip connection into the output?)"
            )
        return act
    for act in ACTIVATIONS.values():
        if fits(act):
            return act
    after = calls[calls.index(final) + 1 :]
    blockers = [c for c in after if isinstance(c.module, NON_INVERTIBLE)]
    if blockers:
        last = blockers[-1]
        raise NotInvertibleError(
            f"the output activation {type(last.module).__name__} ({last.name!r}) is not invertible; "
            "FLIPAD needs tanh, sigmoid or no activation after the final layer (use ReconstructionLossDetector)"
        )
    raise NotInvertibleError(
        f"the output is not tanh, sigmoid or identity of the final layer {final.name!r}: another path reaches "
        "the output (a skip connection into the output?); use ReconstructionLossDetector for such generators"
    )


def producer_of(calls: list[LayerCall], tensor: torch.Tensor, before: LayerCall | None = None) -> LayerCall | None:
    """The last recorded call whose output is ``tensor`` (the same storage), if any.

    With ``before``, only calls recorded before that one are searched.
    """
    end = calls.index(before) if before is not None else len(calls)
    return next((c for c in reversed(calls[:end]) if _same_tensor(c.output, tensor)), None)


def _penultimate_bounds(calls: list[LayerCall], final: LayerCall) -> tuple[float | None, float | None]:
    """Bounds on the final layer's input known from the module that made it (ReLU: >= 0, ...).

    Modules that keep values within the range of their input (upsampling, pooling, dropout
    in eval mode) are looked through.
    """
    tensor, consumer = final.inputs[0], final
    while True:
        producer = producer_of(calls, tensor, before=consumer)
        if producer is None:
            return (None, None)
        if isinstance(producer.module, RANGE_PRESERVING) and producer.inputs:
            tensor, consumer = producer.inputs[0], producer
            continue
        return BOUNDS_OF_PRECEDING.get(type(producer.module), (None, None))


def trace_generator(
    module: nn.Module,
    latents: torch.Tensor,
    final_layer: str | nn.Module | None = None,
    activation: str | None = None,
) -> TraceResult:
    """Trace ``module`` (in eval mode) on ``latents`` and identify its final layer and output activation."""
    calls, out = record_calls(module, latents)
    final = find_final(calls, module, final_layer)
    pre = final.output
    if not isinstance(pre, torch.Tensor):
        raise NotInvertibleError(f"the final layer {final.name!r} did not return a tensor")
    act = _match_activation(pre, out, calls, final, activation)
    name = final.name or next(n for n, m in module.named_modules() if m is final.module)
    return TraceResult(
        final_layer_name=name,
        final_layer=final.module,
        activation=act,
        penultimate_shape=tuple(final.inputs[0].shape[1:]),
        output_shape=tuple(out.shape[1:]),
        penultimate_bounds=_penultimate_bounds(calls, final),
    )
