"""Small user-style generator modules shared by the tests."""

from __future__ import annotations

from torch import nn


class VectorLatentGenerator(nn.Module):
    """User-style generator: a latent vector reshaped inside, nested Sequentials, a final ConvTranspose2d."""

    def __init__(self, latent_dim: int = 16, out_activation: nn.Module | None = None):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(latent_dim, 8 * 4 * 4), nn.ReLU())
        self.body = nn.Sequential(
            nn.Sequential(nn.ConvTranspose2d(8, 4, 4, 2, 1), nn.BatchNorm2d(4), nn.ReLU()),
            nn.Sequential(nn.ConvTranspose2d(4, 1, 4, 2, 1), out_activation or nn.Tanh()),
        )

    def forward(self, z):
        return self.body(self.fc(z).view(-1, 8, 4, 4))


class SkipToOutput(nn.Module):
    """A generator FLIPAD must refuse: the output is tanh(conv(h) + h), a skip connection into the output."""

    def __init__(self, latent_dim: int = 8, size: int = 8):
        super().__init__()
        self.latent_shape = (latent_dim,)
        self.size = size
        self.fc = nn.Linear(latent_dim, 2 * size * size)
        self.conv = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, z):
        h = self.fc(z).view(-1, 2, self.size, self.size)
        return (self.conv(h) + h[:, :1]).tanh()


GENERATOR_CODE = '''
import torch
from torch import nn


class Tiny(nn.Module):
    """A generator this project has never seen: latent 64 reshaped inside, upsample + conv + tanh."""

    def __init__(self, width=8):
        super().__init__()
        self.fc = nn.Linear(64, width * 8 * 8)
        self.width = width
        self.body = nn.Sequential(nn.ReLU(), nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.Upsample(scale_factor=2))
        self.out = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, z):
        h = self.body(self.fc(z).view(-1, self.width, 8, 8))
        return torch.tanh(self.out(h))


def make(width=8):
    torch.manual_seed(3)
    return Tiny(width)
'''


def small_config(spec, weights, real, **overrides):
    """A quick onboarding configuration for the tiny user generator."""
    from flows.onboard import OnboardConfig

    values = dict(name="tiny-gen", generator=spec, weights=str(weights), latent_shape=(64,), real=str(real),
                  num_samples=150, num_validation=100, num_test=60, family_settings={"flipad": {"epochs": 4}}, fnr=(0.05, 0.1),
                  detector="flipad", open_world=False)
    return OnboardConfig(**{**values, **overrides})
