"""Probe: does second-order latent refinement make the reconstruction search exact and fast?

    python bench/exact_inversion_probe.py [--target convT+tanh] [--items 50] [--iterations 15]
                                          [--candidates 64] [--starts 1]

On one target of ``bench/core_bar.py`` and its look-alike (``bench/in_the_wild.py``'s, same
cache), the same items are inverted by today's search (Adam, ``ReconstructionConfig()``) and by
Levenberg-Marquardt in latent space started from the best screened random latents (the Jacobian
by forward-mode differentiation, ``torch.func.jacfwd`` batched with ``vmap``; an item stops once
its MSE is below twice the quantisation floor). Prints seconds per item and the MSE quantiles
(min, median, 99.5%, max) of own and look-alike items, pristine and after JPEG q80, beside the
floor ``(2/255)^2 / 12``. This is an experiment kept to be rerun, not a detector: the search in
``flipad`` is the Adam search until a probe like this one shows a better one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from core_bar import output_range, samples, trained  # noqa: E402
from in_the_wild import lookalike  # noqa: E402

from flipad.inversion.latent import ReconstructionConfig, _starts, reconstruction_losses  # noqa: E402
from flipad.io.data import load_fashion_mnist, to_output_range  # noqa: E402
from flipad.io.perturb import perturb  # noqa: E402

FLOOR = (2 / 255) ** 2 / 12  # MSE of an 8-bit copy in [-1, 1]


def levenberg_marquardt(module, targets: torch.Tensor, z: torch.Tensor, iterations: int) -> torch.Tensor:
    """Per-item LM on ``||module(z) - target||^2`` from ``z``; returns the final MSE per item."""
    flat = targets.flatten(1)

    def one(zi: torch.Tensor) -> torch.Tensor:
        return module(zi[None])[0].flatten()

    with torch.no_grad():
        loss = ((module(z).flatten(1) - flat) ** 2).mean(1)
    damping = torch.full((len(z),), 1e-2)
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


def quantiles(loss: torch.Tensor) -> str:
    q = np.quantile(loss.numpy(), [0, 0.5, 0.995, 1])
    return " ".join(f"{v:.2e}" for v in q)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="convT+tanh")
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--items", type=int, default=50)
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--starts", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path(".flipad/bench"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    real = load_fashion_mnist("train", 32, limit=20_000)
    module = trained(args.target, args.train_steps, real, args.cache)
    other = lookalike(args.target, args.train_steps, real, args.cache)
    low_high = output_range(args.target)
    own, look = samples(args.target, module, args.items, 31337), samples(args.target, other, args.items, 31337)
    sets = {"own": own, "own jpeg q80": perturb(own, "jpeg q80"), "lookalike": look, "lookalike jpeg q80": perturb(look, "jpeg q80")}
    print(f"quantisation floor {FLOOR:.2e}; MSE quantiles: min median 99.5% max")
    config = ReconstructionConfig(candidates=args.candidates, starts=args.starts)
    for name, images in sets.items():
        targets = to_output_range(images, *low_high)
        start = time.perf_counter()
        adam = reconstruction_losses(module, module.latent_shape, targets, ReconstructionConfig())
        adam_s = (time.perf_counter() - start) / len(images)
        start = time.perf_counter()
        with torch.no_grad():
            z = _starts(module, module.latent_shape, targets, config, torch.Generator().manual_seed(0))
        lm = levenberg_marquardt(module, targets.repeat_interleave(args.starts, 0), z, args.iterations)
        lm = lm.view(len(images), args.starts).min(1).values
        lm_s = (time.perf_counter() - start) / len(images)
        print(f"{name:20s} adam {adam_s:.3f} s/item  {quantiles(adam)}  |  lm {lm_s:.3f} s/item  {quantiles(lm)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
