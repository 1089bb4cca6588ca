"""Training the built-in generators (for the demo, the tests and the benchmark's generator zoo)."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..device import resolve_device
from ..io.data import to_output_range
from ..progress import report
from .architectures import DCGANDiscriminator, EBGANDiscriminator

__all__ = ["train_gan", "LOSSES"]

logger = logging.getLogger(__name__)


LOSSES = ("bce", "lsgan", "wgan-gp", "ebgan")
GRADIENT_PENALTY = 10.0  # WGAN-GP's lambda
EBGAN_MARGIN = 1.0  # in units of the energy of a random image, see _ebgan_margin


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
    critic_steps: int = 1,
) -> nn.Module:
    """Train ``generator`` on uint8 ``images`` with one of the four paper families' objectives.

    ``loss``: ``"bce"`` (DCGAN's non-saturating loss), ``"lsgan"`` (least squares), ``"wgan-gp"``
    (Wasserstein loss, gradient penalty 10, a critic without batch norm, Adam betas (0.5, 0.9))
    or ``"ebgan"`` (an autoencoder's reconstruction error as energy, hinge margin on fakes).
    ``critic_steps`` discriminator updates per generator update (WGAN-GP's paper uses 5).
    ``output_range`` is the generator's output range ((-1, 1) for tanh, (0, 1) for sigmoid).
    Deterministic for a seed on the CPU. Returns the generator in eval mode, on the CPU.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    latent_shape = tuple(generator.latent_shape)
    _, channels, size, _ = images.shape
    if loss == "ebgan":
        disc: nn.Module = EBGANDiscriminator(channels=channels, width=32)
    else:
        disc = DCGANDiscriminator(channels=channels, image_size=size, width=32, batch_norm=loss != "wgan-gp")
    disc.to(dev)
    generator.to(dev).train()
    betas = (0.5, 0.9) if loss == "wgan-gp" else (0.5, 0.999)
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=betas)
    data = to_output_range(images, *output_range)
    margin = EBGAN_MARGIN * _random_energy(disc, data, output_range, dev) if loss == "ebgan" else 0.0

    def batch() -> torch.Tensor:
        return data[rng.integers(0, len(data), batch_size)].to(dev)

    def latents() -> torch.Tensor:
        return torch.randn(batch_size, *latent_shape, device=dev)

    def critic_step(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        opt_d.zero_grad()
        d_loss = _discriminator_loss(loss, disc, real, fake, margin)
        d_loss.backward()
        opt_d.step()
        return d_loss

    for _ in tqdm(range(steps), desc="train GAN", disable=not progress):
        real = batch()
        fake = generator(latents())  # the generator's update below reuses these samples
        d_loss = critic_step(real, fake.detach())
        for _ in range(critic_steps - 1):
            with torch.no_grad():
                extra = generator(latents())
            d_loss = critic_step(batch(), extra)
        opt_g.zero_grad()
        g_loss = _generator_loss(loss, disc, fake)
        g_loss.backward()
        opt_g.step()
        report(1)
    logger.info("GAN (%s) trained for %d steps: d_loss %.3f, g_loss %.3f", loss, steps, d_loss.item(), g_loss.item())
    return generator.cpu().eval()


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def _discriminator_loss(loss: str, disc: nn.Module, real: torch.Tensor, fake: torch.Tensor, margin: float) -> torch.Tensor:
    if loss == "bce":
        return _bce(disc(real), 1.0) + _bce(disc(fake), 0.0)
    if loss == "lsgan":
        return ((disc(real) - 1.0) ** 2).mean() + (disc(fake) ** 2).mean()
    if loss == "ebgan":
        return disc(real).mean() + torch.relu(margin - disc(fake)).mean()
    mix = torch.rand(len(real), 1, 1, 1, device=real.device)
    between = (mix * real + (1 - mix) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(disc(between).sum(), between, create_graph=True)
    penalty = ((grad.flatten(1).norm(dim=1) - 1.0) ** 2).mean()
    return disc(fake).mean() - disc(real).mean() + GRADIENT_PENALTY * penalty


def _generator_loss(loss: str, disc: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    if loss == "bce":
        return _bce(disc(fake), 1.0)
    if loss == "lsgan":
        return ((disc(fake) - 1.0) ** 2).mean()
    if loss == "ebgan":
        return disc(fake).mean()
    return -disc(fake).mean()


def _random_energy(disc: nn.Module, data: torch.Tensor, output_range: tuple[float, float], dev: torch.device) -> float:
    """The untrained autoencoder's energy of uniform noise images: EBGAN's margin scale."""
    low, high = output_range
    with torch.no_grad():
        noise = torch.rand(64, *data.shape[1:], device=dev) * (high - low) + low
        return float(disc(noise).mean())
