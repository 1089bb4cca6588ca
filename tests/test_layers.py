"""The final layer as an operator: adjoint identity, Lipschitz constant, Gram matrix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flipad.inversion.layers import LinearMap


def _map_for(layer: nn.Module, input_shape):
    with torch.no_grad():
        out = layer(torch.zeros(1, *input_shape))
    return LinearMap(layer, input_shape, out.shape[1:])


LAYERS = [
    (nn.Linear(12, 7), (12,)),
    (nn.Linear(12, 7, bias=False), (12,)),
    (nn.Conv2d(4, 3, 3, 1, 1), (4, 9, 9)),
    (nn.Conv2d(4, 3, 3, 2, 1), (4, 9, 9)),
    (nn.Conv2d(4, 3, 4, 2, 0, bias=False), (4, 10, 10)),
    (nn.Conv2d(4, 3, 5, 3, 2), (4, 11, 11)),
    (nn.Conv2d(4, 2, 3, 1, 2, dilation=2), (4, 8, 8)),
    (nn.Conv2d(4, 2, 3, 2, 1, groups=2), (4, 9, 9)),
    (nn.Conv2d(4, 3, 3, 1, "same"), (4, 8, 8)),
    (nn.Conv2d(4, 3, 3, 1, 1, padding_mode="reflect"), (4, 8, 8)),
    (nn.ConvTranspose2d(4, 3, 4, 2, 1), (4, 6, 6)),
    (nn.ConvTranspose2d(4, 3, 4, 2, 1, bias=False), (4, 6, 6)),
    (nn.ConvTranspose2d(4, 3, 3, 2, 1, output_padding=1), (4, 5, 5)),
    (nn.ConvTranspose2d(4, 3, 5, 3, 2, output_padding=2), (4, 5, 5)),
    (nn.ConvTranspose2d(4, 1, 4, 1, 0), (4, 4, 4)),
    (nn.ConvTranspose2d(4, 2, 3, 2, 0, groups=2, dilation=2), (4, 5, 5)),
]


@pytest.mark.parametrize("layer,input_shape", LAYERS, ids=[repr(layer) for layer, _ in LAYERS])
def test_adjoint_identity(layer, input_shape):
    op = _map_for(layer, input_shape)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, *input_shape, generator=gen)
    y = torch.randn(3, *op.output_shape, generator=gen)
    lhs = (op.forward(x) * y).sum()
    rhs = (x * op.adjoint(y)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-4, atol=1e-4), (lhs.item(), rhs.item())


@pytest.mark.parametrize("layer,input_shape", LAYERS[:6] + LAYERS[10:13])
def test_forward_plus_bias_is_the_layer(layer, input_shape):
    op = _map_for(layer, input_shape)
    z = torch.randn(2, *input_shape)
    with torch.no_grad():
        assert torch.allclose(op.forward(z) + op.bias_map(torch.device("cpu")), layer(z), atol=1e-5)


def _dense(op: LinearMap) -> torch.Tensor:
    eye = torch.eye(op.num_inputs).view(op.num_inputs, *op.input_shape)
    return op.forward(eye).reshape(op.num_inputs, op.num_outputs).T


def test_lipschitz_is_the_largest_eigenvalue():
    op = _map_for(nn.ConvTranspose2d(4, 2, 4, 2, 1), (4, 5, 5))
    a = _dense(op)
    top = torch.linalg.eigvalsh(a.T @ a).max().item()
    lip = op.lipschitz(torch.device("cpu"))
    assert top <= lip <= top * 1.03


def test_gram_matrix_matches_dense_product():
    op = _map_for(nn.Conv2d(3, 2, 3, 2, 1), (3, 6, 6))
    a = _dense(op).double()
    assert torch.allclose(op.gram_matrix(torch.device("cpu"), chunk=7), a @ a.T, atol=1e-5)


def test_unsupported_layer_is_refused():
    with pytest.raises(TypeError, match="Linear, Conv2d and ConvTranspose2d"):
        LinearMap(nn.Conv1d(2, 2, 3), (2, 8), (2, 6))
