"""Probe: does second-order latent refinement make the reconstruction search exact and fast?

    python bench/exact_inversion_probe.py [--target convT+tanh] [--items 100] [--iterations 10]
                                          [--candidates 64] [--starts 1] [--encoder-steps 2000]
                                          [--num-validation 400]

On one target of ``bench/core_bar.py`` and its look-alike (``bench/in_the_wild.py``'s, same
cache), the same items (own and look-alike, pristine and after JPEG q90 / q80, and real images)
are inverted by

- today's search (Adam, ``ReconstructionConfig()`` in the MSE), on the module as it is (``adam``) and on
  the channels-last copy the search now runs (``adam-cl``, :func:`flipad.device.search_layout`);
- Levenberg-Marquardt (LM) in latent space from the best screened random latents;
- the ``encoder-lm`` search of :mod:`flipad.inversion.amortised` (``flipad onboard``'s default):
  LM from an amortised encoder's latent, the encoder trained for ``--encoder-steps`` batches of
  fresh 8-bit ``(z, G(z))`` pairs of the generator (nothing from the owner but the generator);
- the same search as the default verdict runs it (``encoder-lm settled``): a
  :class:`ReconstructionLossDetector` fitted as ``flipad onboard`` fits it (thresholds from
  ``--num-validation`` own samples and the first half of them re-saved as JPEG q95-q70, at FNR
  0.005), whose scoring stops each item once its verdict is settled (:class:`Exits`); its loss is
  not the search's last, so its row prints the verdict: the share of each set attributed.

The LM rows run on the channels-last copy and take their Jacobians as the detector does
(:func:`flipad.inversion.tangents.search_jacobian`: bfloat16 tangents where the CPU has native
bfloat16, else forward differences), each serving up to 8 chord steps; an item stops once its MSE
is below twice the quantisation floor. Prints seconds per item, the MSE quantiles (min, median,
90%, 99.5%, max) beside the floor ``(2/255)^2 / 12``, and per variant the share of look-alike items above the own items' 99.5% quantile (rejection at an
FNR of 0.005).
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

from flipad import ReconstructionLossDetector  # noqa: E402
from flipad.device import search_layout  # noqa: E402
from flipad.detectors.base import ROBUST_PERTURBATIONS  # noqa: E402
from flipad.inversion.amortised import levenberg_marquardt, quantisation_floor  # noqa: E402
from flipad.inversion.latent import ReconstructionConfig, _starts, reconstruction_losses  # noqa: E402
from flipad.io.data import to_output_range  # noqa: E402
from flows.datasets import load_fashion_mnist  # noqa: E402
from flipad.inversion.tangents import search_jacobian  # noqa: E402
from flipad.io.perturb import perturb  # noqa: E402

VARIANTS = ("pristine", "jpeg q90", "jpeg q80")


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
    parser.add_argument("--num-validation", type=int, default=400, help="own samples the settled verdict is fitted on")
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
    fast = search_layout(module, module.latent_shape)
    differentiate = search_jacobian(fast, module.latent_shape)
    print(f"LM Jacobians: {differentiate.name}")
    searches = ["adam", "adam-cl", "lm"]
    net = None
    if args.encoder_steps:
        start = time.perf_counter()
        detector = ReconstructionLossDetector(
            module, module.latent_shape, output_range=low_high, n_validation=args.num_validation, progress=False,
            config=ReconstructionConfig(method="encoder-lm", encoder_steps=args.encoder_steps, lm_iterations=args.iterations),
            perturbations=ROBUST_PERTURBATIONS, n_perturbed=args.num_validation // 2).fit()
        net = detector.search_.encoder
        print(f"encoder: {args.encoder_steps} steps on fresh (z, G(z)) pairs, then the verdict's thresholds: "
              f"{time.perf_counter() - start:.0f} s; threshold {detector.threshold():.2e}, exits {detector.exits_}")
        searches += ["encoder", "encoder+lm"]
    floor = quantisation_floor(low_high)
    print(f"quantisation floor {floor:.2e}; MSE quantiles: min median 90% 99.5% max")
    config = ReconstructionConfig(candidates=args.candidates, starts=args.starts)
    losses: dict[tuple[str, str], torch.Tensor] = {}
    for name, images in sets.items():
        targets = to_output_range(images, *low_high)
        for search in searches:
            start = time.perf_counter()
            if search.startswith("adam"):
                loss = reconstruction_losses(module if search == "adam" else fast, module.latent_shape, targets,
                                             ReconstructionConfig(metric="mse"), low_high)
            elif search == "lm":
                with torch.no_grad():
                    z = _starts(fast, module.latent_shape, targets, config, torch.Generator().manual_seed(0))
                loss = levenberg_marquardt(fast, targets.repeat_interleave(args.starts, 0), z, args.iterations, floor,
                                          differentiate=differentiate)
                loss = loss.view(len(images), args.starts).min(1).values
            else:
                with torch.no_grad():
                    z = net(targets)
                    loss = ((fast(z) - targets) ** 2).flatten(1).mean(1)
                if search == "encoder+lm":
                    loss = levenberg_marquardt(fast, targets, z, args.iterations, floor, differentiate=differentiate)
            seconds = (time.perf_counter() - start) / len(images)
            losses[name, search] = loss
            print(f"{name:20s} {search:11s} {seconds:.4f} s/item  {quantiles(loss)}", flush=True)
        if net is not None:
            start = time.perf_counter()
            attributed = detector.score(images).is_generated().mean()
            seconds = (time.perf_counter() - start) / len(images)
            print(f"{name:20s} encoder-lm settled {seconds:.4f} s/item  attributed {attributed:.3f}", flush=True)
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
