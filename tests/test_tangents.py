"""The tangent-propagation Jacobian: the exact Jacobian to bfloat16 precision, or forward differences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import SkipToOutput
from torch import nn

from flipad.device import native_bfloat16
from flipad.inversion.amortised import jacobian
from flipad.inversion.tangents import (
    ForwardDifferences,
    TangentJacobian,
    UnsupportedOperation,
    search_jacobian,
)


class EveryRule(nn.Module):
    """One generator using each operation with a tangent rule: the trace must cover all of them."""

    def __init__(self):
        super().__init__()
        self.latent_shape = (6,)
        self.fc = nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.LeakyReLU(0.2))
        self.unflatten = nn.Unflatten(1, (2, 4, 4))
        self.up = nn.ConvTranspose2d(2, 3, 4, 2, 1)
        self.norm = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(5, 2, 3, padding=1)
        self.resize = nn.Upsample(scale_factor=2)

    def forward(self, z):
        h = self.unflatten(self.fc(z))
        a = F.relu(self.norm(self.up(h)))
        b = F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False)
        x = self.conv(torch.cat([a, b], dim=1)) * 0.5 - a[:, :2] / 2.0
        y = self.resize(x)
        return torch.sigmoid(y[:, :1]) + torch.tanh(y[:, 1:]).flatten(1).view(-1, 1, 16, 16)


def exact_jacobian(module: nn.Module, z: torch.Tensor) -> torch.Tensor:
    shape = z.shape[1:]
    return torch.func.vmap(torch.func.jacfwd(lambda zi: module(zi.view(1, *shape))[0].flatten()))(z.flatten(1))


def randomised(module: nn.Module) -> nn.Module:
    """``module`` in eval mode with batch-norm statistics that are not the identity."""
    torch.manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return module.eval()


@pytest.mark.parametrize("make", [SkipToOutput, lambda: randomised(EveryRule())], ids=["skip", "every-rule"])
def test_tangent_jacobian_is_the_exact_jacobian_to_bfloat16_precision(make):
    module = make().eval()
    z = torch.randn(5, *module.latent_shape, generator=torch.Generator().manual_seed(3))
    exact = exact_jacobian(module, z)
    got = TangentJacobian(module)(z)
    assert got.shape == exact.shape == (5, exact.shape[1], z[0].numel())
    assert (got - exact).norm() / exact.norm() < 0.02
    # float32 tangents are the exact Jacobian: the rules themselves are right, not just close
    torch.testing.assert_close(TangentJacobian(module, dtype=torch.float32)(z), exact, rtol=1e-4, atol=1e-5)


def test_a_sketched_jacobian_is_the_jacobian_times_the_basis_by_tangents_and_by_differences():
    module = randomised(EveryRule())
    z = torch.randn(5, *module.latent_shape, generator=torch.Generator().manual_seed(3))
    basis = torch.linalg.qr(torch.randn(6, 2, generator=torch.Generator().manual_seed(4)))[0]
    expected = exact_jacobian(module, z) @ basis
    # bfloat16 tangents as close as the full Jacobian's (0.02); float32 differences of 1e-3 across
    # this generator's ReLU kinks about 3.5% off, as its full forward differences are
    for differentiate, tolerance in ((TangentJacobian(module), 0.02), (ForwardDifferences(module), 0.06)):
        got = differentiate(z, basis)
        assert got.shape == expected.shape == (5, 256, 2)
        assert (got - expected).norm() / expected.norm() < tolerance, type(differentiate).__name__


def test_trained_generator_tangents_are_as_close_to_exact_as_forward_differences(trained_generator):
    z = torch.randn(6, 64, 1, 1, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = exact_jacobian(trained_generator, z)
        tangents = (TangentJacobian(trained_generator, rows=128)(z) - exact).norm() / exact.norm()
        differences = (jacobian(trained_generator, z) - exact).norm() / exact.norm()
    # bfloat16 rounding (~0.4%) against forward differences' truncation (0.3-0.8% on the bench generators)
    assert tangents < 0.01 and tangents < 3 * differences, (tangents, differences)


class ValueBranch(nn.Module):
    latent_shape = (4,)

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 16)

    def forward(self, z):
        h = self.fc(z)
        return h.tanh() if h.sum() > 0 else h.sigmoid()  # control flow on values: fx cannot trace it


class Squares(ValueBranch):
    def forward(self, z):
        h = self.fc(z)
        return h * h  # a product of two latent-dependent values: no rule here


class BatchMixing(ValueBranch):
    def forward(self, z):
        return torch.cat([self.fc(z), self.fc(z)], dim=0)  # rows of other items


@pytest.mark.parametrize("module", [ValueBranch(), Squares(), BatchMixing()], ids=["control-flow", "product", "batch-cat"])
def test_generators_without_tangent_rules_keep_forward_differences(module):
    module.eval()
    with pytest.raises(UnsupportedOperation):
        TangentJacobian(module)(torch.randn(2, 4))
    chosen = search_jacobian(module, module.latent_shape)
    assert isinstance(chosen, ForwardDifferences) and chosen.name == "forward-differences"


def test_training_mode_batch_norm_is_refused_at_construction():
    module = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)).train()
    with pytest.raises(UnsupportedOperation, match="batch norm without running statistics"):
        TangentJacobian(module)


def test_search_picks_tangents_where_bfloat16_is_native(trained_generator):
    chosen = search_jacobian(trained_generator, (64, 1, 1))
    assert chosen.name == ("tangents-bf16" if native_bfloat16(torch.device("cpu")) else "forward-differences")
    z = torch.randn(3, 64, 1, 1, generator=torch.Generator().manual_seed(4))
    assert (chosen(z) - jacobian(trained_generator, z)).norm() / jacobian(trained_generator, z).norm() < 0.05
