"""Probe: does second-order latent refinement make the reconstruction search exact and fast?

    python bench/exact_inversion_probe.py [--target convT+tanh] [--items 100] [--iterations 10]
                                          [--candidates 64] [--starts 1] [--encoder-steps 2000]

On one target of ``bench/core_bar.py`` and its look-alike (``bench/in_the_wild.py``'s, same
cache), the same items (own and look-alike, pristine and after JPEG q90 / q80, and real images)
are inverted by

- today's search (Adam, ``ReconstructionConfig()``);
- Levenberg-Marquardt (LM) in latent space from the best screened random latents;
- LM from an amortised encoder's latent: a small conv encoder trained on fresh ``(z, G(z))``
  pairs of the generator (8-bit quantised, loss ``|E(x) - z|^2 + 10 |G(E(x)) - x|^2``), which
  needs nothing from the owner but the generator.

LM takes the Jacobian by forward-mode differentiation (``torch.func.jacfwd`` batched with
``vmap``); an item stops once its MSE is below twice the quantisation floor. Prints seconds per
item, the MSE quantiles (min, median, 90%, 99.5%, max) beside the floor ``(2/255)^2 / 12``, and
per variant the share of look-alike items above the own items' 99.5% quantile (rejection at an
FNR of 0.005). This is an experiment kept to be rerun, not a detector: the search in ``flipad``
is the Adam search until a probe like this one shows a better one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from core_bar import output_range, samples, trained  # noqa: E402
from in_the_wild import lookalike  # noqa: E402

from flipad.inversion.latent import ReconstructionConfig, _starts, reconstruction_losses  # noqa: E402
from flipad.io.data import load_fashion_mnist, to_output_range  # noqa: E402
from flipad.io.perturb import perturb  # noqa: E402

FLOOR = (2 / 255) ** 2 / 12  # MSE of an 8-bit copy in [-1, 1]
VARIANTS = ("pristine", "jpeg q90", "jpeg q80")


def levenberg_marquardt(module, targets: torch.Tensor, z: torch.Tensor, iterations: int) -> torch.Tensor:
    """Per-item LM on ``||module(z) - target||^2`` from ``z``; returns the final MSE per item."""
    flat = targets.flatten(1)

    def one(zi: torch.Tensor) -> torch.Tensor:
        return module(zi[None])[0].flatten()

    with torch.no_grad():
        loss = ((module(z).flatten(1) - flat) ** 2).mean(1)
    damping = torch.full((len(z),), 1e-3)
    active = loss > 2 * FLOOR
    for _ in range(iterations):
        idx = active.nonzero().squeeze(1)
        if not len(idx):
            break
        za = z[idx]
        with torch.no_grad():
            jac = torch.func.vmap(torch.func.jacfwd(one))(za)
            residual = module(za).flatten(1) - flat[idx]
        normal = jac.transpose(1, 2) @ jac
        gradient = (jac.transpose(1, 2) @ residual[..., None])[..., 0]
        normal = normal + torch.diag_embed(damping[idx, None] * (torch.diagonal(normal, dim1=1, dim2=2) + 1e-9))
        step = torch.linalg.solve(normal, -gradient)
        with torch.no_grad():
            new = ((module(za + step).flatten(1) - flat[idx]) ** 2).mean(1)
        better = new < loss[idx]
        z[idx[better]] = za[better] + step[better]
        loss[idx] = torch.minimum(new, loss[idx])
        damping[idx] = torch.where(better, damping[idx] / 5, damping[idx] * 5)
        active[idx] = loss[idx] > 2 * FLOOR
    return loss


def encoder(latent_dim: int, width: int = 32) -> nn.Module:
    """A conv encoder from a 1x32x32 image to a latent vector."""
    return nn.Sequential(
        nn.Conv2d(1, width, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(width, 2 * width, 4, 2, 1), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
        nn.Conv2d(2 * width, 4 * width, 4, 2, 1), nn.BatchNorm2d(4 * width), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(4 * width * 16, 512), nn.LeakyReLU(0.2), nn.Linear(512, latent_dim),
    )


def train_encoder(module: nn.Module, low_high: tuple[float, float], steps: int, batch: int = 256,
                  image_weight: float = 10.0, seed: int = 0) -> nn.Module:
    """The amortised inverter: trained on fresh 8-bit ``(z, G(z))`` pairs of ``module``."""
    torch.manual_seed(seed)
    low, high = low_high
    net = encoder(module.latent_shape[0])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.requires_grad_(False)
    for _ in range(steps):
        z = torch.randn(batch, *module.latent_shape, generator=gen)
        with torch.no_grad():
            scale = (high - low) / 255
            x = torch.round((module(z) - low) / scale) * scale + low  # what an 8-bit copy holds
        guess = net(x)
        loss = ((guess - z) ** 2).mean() + image_weight * ((module(guess) - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return net.eval()


def quantiles(loss: torch.Tensor) -> str:
    q = np.quantile(loss.numpy(), [0, 0.5, 0.9, 0.995, 1])
    return " ".join(f"{v:.2e}" for v in q)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="convT+tanh")
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--starts", type=int, default=1)
    parser.add_argument("--encoder-steps", type=int, default=2000, help="0: no encoder rows")
    parser.add_argument("--cache", type=Path, default=Path(".flipad/bench"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    real = load_fashion_mnist("train", 32, limit=20_000)
    module = trained(args.target, args.train_steps, real, args.cache)
    other = lookalike(args.target, args.train_steps, real, args.cache)
    low_high = output_range(args.target)
    own, look = samples(args.target, module, args.items, 31337), samples(args.target, other, args.items, 31337)
    sets = {**{f"own {v}": own if v == "pristine" else perturb(own, v) for v in VARIANTS},
            **{f"lookalike {v}": look if v == "pristine" else perturb(look, v) for v in VARIANTS},
            "real": load_fashion_mnist("test", 32, limit=args.items)}
    searches = ["adam", "lm"]
    net = None
    if args.encoder_steps:
        start = time.perf_counter()
        net = train_encoder(module, low_high, args.encoder_steps)
        print(f"encoder: {args.encoder_steps} steps on fresh (z, G(z)) pairs, {time.perf_counter() - start:.0f} s")
        searches += ["encoder", "encoder+lm"]
    print(f"quantisation floor {FLOOR:.2e}; MSE quantiles: min median 90% 99.5% max")
    config = ReconstructionConfig(candidates=args.candidates, starts=args.starts)
    losses: dict[tuple[str, str], torch.Tensor] = {}
    for name, images in sets.items():
        targets = to_output_range(images, *low_high)
        for search in searches:
            start = time.perf_counter()
            if search == "adam":
                loss = reconstruction_losses(module, module.latent_shape, targets, ReconstructionConfig())
            elif search == "lm":
                with torch.no_grad():
                    z = _starts(module, module.latent_shape, targets, config, torch.Generator().manual_seed(0))
                loss = levenberg_marquardt(module, targets.repeat_interleave(args.starts, 0), z, args.iterations)
                loss = loss.view(len(images), args.starts).min(1).values
            else:
                with torch.no_grad():
                    z = net(targets)
                    loss = ((module(z) - targets) ** 2).flatten(1).mean(1)
                if search == "encoder+lm":
                    loss = levenberg_marquardt(module, targets, z, args.iterations)
            seconds = (time.perf_counter() - start) / len(images)
            losses[name, search] = loss
            print(f"{name:20s} {search:11s} {seconds:.4f} s/item  {quantiles(loss)}", flush=True)
    print("look-alike items rejected at the own items' 99.5% quantile (same variant):")
    for search in searches:
        shares = []
        for variant in VARIANTS:
            threshold = torch.quantile(losses[f"own {variant}", search], 0.995)
            shares.append(f"{variant} {(losses[f'lookalike {variant}', search] > threshold).float().mean():.3f}")
        real_share = (losses["real", search] > torch.quantile(losses["own jpeg q80", search], 0.995)).float().mean()
        print(f"  {search:11s} " + "  ".join(shares) + f"  (real above own jpeg q80's: {real_share:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
