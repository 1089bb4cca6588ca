"""Built-in generator architectures: the paper's four GAN families and a tabular MLP.

Every module maps a latent batch of shape ``(N, *latent_shape)`` to samples and
carries its ``latent_shape`` as an attribute, so ``GeneratorAdapter`` can sample
it without being told. Defaults follow the paper (64x64 RGB, latent 100); the
``image_size``/``channels``/``latent_dim`` parameters give the smaller 32x32
grayscale variants used on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "DCGANGenerator",
    "WGANGPGenerator",
    "LSGANGenerator",
    "EBGANGenerator",
    "MLPGenerator",
    "DCGANDiscriminator",
    "EBGANDiscriminator",
    "BUILTIN_GENERATORS",
]


def _num_doublings(image_size: int, start: int) -> int:
    """How many x2 upsamplings take a ``start`` x ``start`` map to ``image_size``."""
    steps, size = 0, start
    while size < image_size:
        size *= 2
        steps += 1
    if size != image_size:
        raise ValueError(f"image_size must be {start} times a power of two, got {image_size}")
    return steps


def _projection(latent_dim: int, features: int) -> nn.Sequential:
    """Linear + BatchNorm + ReLU from the latent vector to a flattened 4x4 map."""
    return nn.Sequential(nn.Linear(latent_dim, features), nn.BatchNorm1d(features), nn.ReLU(True))


class _ProjectedGenerator(nn.Module):
    """Latent vector -> Linear + BN + ReLU -> a (start_channels, 4, 4) map -> ``self.body`` (set by subclasses)."""

    body: nn.Module

    def __init__(self, latent_dim: int, image_size: int, width: int):
        super().__init__()
        self.latent_shape = (latent_dim,)
        self.ups = _num_doublings(image_size, 4)
        self.start_channels = width * 2 ** (self.ups - 1)
        self.project = _projection(latent_dim, self.start_channels * 16)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z.flatten(1)).view(-1, self.start_channels, 4, 4))


class DCGANGenerator(nn.Module):
    """DCGAN (Radford et al.): latent (D, 1, 1) -> ConvTranspose stack -> ConvTranspose2d + tanh."""

    def __init__(self, latent_dim: int = 100, channels: int = 3, image_size: int = 64, width: int = 64):
        super().__init__()
        self.latent_shape = (latent_dim, 1, 1)
        ups = _num_doublings(image_size, 4)  # the first block makes 4x4
        mult = 2 ** (ups - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, width * mult, 4, 1, 0, bias=False),
            nn.BatchNorm2d(width * mult),
            nn.ReLU(True),
        ]
        for _ in range(ups - 1):
            layers += [
                nn.ConvTranspose2d(width * mult, width * mult // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width * mult // 2),
                nn.ReLU(True),
            ]
            mult //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


class WGANGPGenerator(_ProjectedGenerator):
    """WGAN-GP (Gulrajani et al.): latent vector -> Linear -> 4x4 map -> ConvTranspose stack + tanh."""

    def __init__(self, latent_dim: int = 100, channels: int = 3, image_size: int = 64, width: int = 64):
        super().__init__(latent_dim, image_size, width)
        ups = self.ups
        layers: list[nn.Module] = []
        ch = self.start_channels
        for _ in range(ups - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1), nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1), nn.Tanh()]
        self.body = nn.Sequential(*layers)


class LSGANGenerator(_ProjectedGenerator):
    """LSGAN (Mao et al.): Linear -> [upsample x2, 3x3 conv, BN, ReLU]* -> upsample, 3x3 Conv2d + tanh."""

    def __init__(self, latent_dim: int = 100, channels: int = 3, image_size: int = 64, width: int = 64):
        super().__init__(latent_dim, image_size, width)
        ups = self.ups
        layers: list[nn.Module] = []
        ch = self.start_channels
        for _ in range(ups - 1):
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(ch, ch // 2, 3, 1, 1),
                nn.BatchNorm2d(ch // 2),
                nn.ReLU(True),
            ]
            ch //= 2
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, channels, 3, 1, 1), nn.Tanh()]
        self.body = nn.Sequential(*layers)


class EBGANGenerator(nn.Module):
    """EBGAN generator as in the paper's code base: two Linear layers, then two ConvTranspose2d + tanh."""

    def __init__(self, latent_dim: int = 100, channels: int = 3, image_size: int = 64, width: int = 64):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {image_size}")
        self.latent_shape = (latent_dim,)
        self.base = image_size // 4
        self.width = width
        self.fc = nn.Sequential(
            nn.Linear(latent_dim, 1024),
            nn.BatchNorm1d(1024),
            nn.ReLU(True),
            nn.Linear(1024, 2 * width * self.base * self.base),
            nn.BatchNorm1d(2 * width * self.base * self.base),
            nn.ReLU(True),
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1),
            nn.BatchNorm2d(width),
            nn.ReLU(True),
            nn.ConvTranspose2d(width, channels, 4, 2, 1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z.flatten(1)).view(-1, 2 * self.width, self.base, self.base)
        return self.deconv(h)


class MLPGenerator(nn.Module):
    """Tabular generator: an MLP ending in a Linear layer with no output activation."""

    def __init__(self, latent_dim: int = 32, num_features: int = 16, hidden: int = 128, depth: int = 2):
        super().__init__()
        self.latent_shape = (latent_dim,)
        layers: list[nn.Module] = []
        width = latent_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(True)]
            width = hidden
        layers.append(nn.Linear(width, num_features))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator (logits), used to train the built-in generators. ``batch_norm=False``
    gives the WGAN-GP critic (the gradient penalty is per sample, batch statistics would mix them)."""

    def __init__(self, channels: int = 3, image_size: int = 64, width: int = 64, batch_norm: bool = True):
        super().__init__()
        downs = _num_doublings(image_size, 4)
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        ch = width
        for _ in range(downs - 1):
            norm = [nn.BatchNorm2d(ch * 2)] if batch_norm else []
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False), *norm, nn.LeakyReLU(0.2, True)]
            ch *= 2
        layers.append(nn.Conv2d(ch, 1, 4, 1, 0, bias=False))
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).flatten()


class EBGANDiscriminator(nn.Module):
    """EBGAN's energy: the per-sample mean squared error of a small convolutional autoencoder."""

    def __init__(self, channels: int = 3, width: int = 32):
        super().__init__()
        self.encode = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True),
            nn.Conv2d(width, width * 2, 4, 2, 1), nn.BatchNorm2d(width * 2), nn.LeakyReLU(0.2, True),
        )
        self.decode = nn.Sequential(
            nn.ConvTranspose2d(width * 2, width, 4, 2, 1), nn.BatchNorm2d(width), nn.ReLU(True),
            nn.ConvTranspose2d(width, channels, 4, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((self.decode(self.encode(x)) - x) ** 2).flatten(1).mean(1)


BUILTIN_GENERATORS: dict[str, Callable[..., nn.Module]] = {
    "dcgan": DCGANGenerator,
    "wgan-gp": WGANGPGenerator,
    "lsgan": LSGANGenerator,
    "ebgan": EBGANGenerator,
    "mlp": MLPGenerator,
}
