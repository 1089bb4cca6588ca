"""Training the built-in generators (for the demo, the tests and the benchmark's generator zoo)."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import DCGANDiscriminator
from .device import resolve_device

__all__ = ["train_gan", "images_to_range"]

logger = logging.getLogger(__name__)


def images_to_range(images: np.ndarray, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """uint8 (N, C, H, W) images to float32 in [low, high]."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div(255.0).mul(high - low).add(low)


def train_gan(
    generator: nn.Module,
    images: np.ndarray,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 2e-4,
    seed: int = 0,
    device: str = "auto",
    loss: str = "bce",
    output_range: tuple[float, float] = (-1.0, 1.0),
    progress: bool = True,
) -> nn.Module:
    """Train ``generator`` against a DCGAN discriminator on uint8 ``images``.

    ``loss`` is ``"bce"`` (the non-saturating GAN loss) or ``"lsgan"`` (least squares);
    ``output_range`` is the generator's output range ((-1, 1) for tanh, (0, 1) for sigmoid).
    Returns the generator in eval mode, on the CPU.
    """
    if loss not in ("bce", "lsgan"):
        raise ValueError(f"loss must be 'bce' or 'lsgan', got {loss!r}")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    latent_shape = tuple(generator.latent_shape)
    _, channels, size, _ = images.shape
    disc = DCGANDiscriminator(channels=channels, image_size=size, width=32).to(dev)
    generator.to(dev).train()
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.999))
    data = images_to_range(images, *output_range)

    def criterion(logits: torch.Tensor, target: float) -> torch.Tensor:
        if loss == "lsgan":
            return ((logits - target) ** 2).mean()
        return nn.functional.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))

    for _ in tqdm(range(steps), desc="train GAN", disable=not progress):
        real = data[rng.integers(0, len(data), batch_size)].to(dev)
        z = torch.randn(batch_size, *latent_shape, device=dev)
        fake = generator(z)
        opt_d.zero_grad()
        d_loss = criterion(disc(real), 1.0) + criterion(disc(fake.detach()), 0.0)
        d_loss.backward()
        opt_d.step()
        opt_g.zero_grad()
        g_loss = criterion(disc(fake), 1.0)
        g_loss.backward()
        opt_g.step()
    logger.info("GAN trained for %d steps: d_loss %.3f, g_loss %.3f", steps, d_loss.item(), g_loss.item())
    return generator.cpu().eval()
