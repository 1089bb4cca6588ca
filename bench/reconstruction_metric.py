"""Which loss separates in the wild: the pixel MSE or the residual in JPEG's steps?

    python bench/reconstruction_metric.py [--targets convT+tanh convT+sigmoid] [--items 800]
                                          [--encoder-steps 1000]

For each target of ``bench/core_bar.py``, the encoder-lm search (an encoder trained for
``--encoder-steps`` batches, then Levenberg-Marquardt run to its end, as onboarding's evaluation
runs it) inverts ``--items`` own 8-bit samples, pristine and re-saved as JPEG q95, q90, q80 and
q70 (the default calibration conditions), ``--items`` real test images, and a quarter as many
samples of each other core-bar generator and of the target's other-seed look-alike, pristine
and as JPEG q80. The search lowers the pixel MSE either way; each item gets both losses at the
latent it ends at. Per metric, the threshold is the largest 99.5% quantile over the own
conditions (the default calibration at FNR 0.005); prints each source's share under it, the
lowest foreign loss over the threshold, and the real images' 0.5% and 1% quantiles over it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from core_bar import TARGETS, output_range, samples, trained  # noqa: E402
from in_the_wild import lookalike  # noqa: E402

from flipad.detectors.base import ROBUST_PERTURBATIONS  # noqa: E402
from flipad.inversion.amortised import lm_trajectories, quantisation_floor, train_encoder  # noqa: E402
from flipad.inversion.metrics import METRICS, ResidualMetric  # noqa: E402
from flipad.io.data import to_output_range  # noqa: E402
from flows.datasets import load_fashion_mnist  # noqa: E402
from flipad.io.perturb import perturb  # noqa: E402

SHAPE = (1, 32, 32)


def losses(module: torch.nn.Module, encoder: torch.nn.Module, images: np.ndarray, low_high: tuple[float, float]) -> dict[str, torch.Tensor]:
    """Both metrics at the latent the search ends at (the search is the same for either)."""
    targets = to_output_range(images, *low_high)
    with torch.no_grad():
        z = encoder(targets)
    lm_trajectories(module, targets, z, 10, quantisation_floor(low_high))
    with torch.no_grad():
        residual = (module(z) - targets).flatten(1)
    return {name: ResidualMetric(name, SHAPE, low_high)(residual) for name in METRICS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="*", default=["convT+tanh", "convT+sigmoid"], choices=tuple(TARGETS))
    parser.add_argument("--items", type=int, default=800)
    parser.add_argument("--encoder-steps", type=int, default=1000)
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--cache", type=Path, default=Path(".flipad/bench"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    train_real = load_fashion_mnist("train", 32, limit=20_000)
    modules = {name: trained(name, args.train_steps, train_real, args.cache) for name in TARGETS}
    real = load_fashion_mnist("test", 32, limit=args.items)
    for target in args.targets:
        module, low_high = modules[target], output_range(target)
        encoder = train_encoder(module, module.latent_shape, SHAPE, low_high, args.encoder_steps)
        own = samples(target, module, args.items, 777)
        own_sets = {"own": own, **{f"own {p}": perturb(own, p) for p in ROBUST_PERTURBATIONS}}
        foreign = {name: samples(name, m, args.items // 4, 4242) for name, m in modules.items() if name != target}
        foreign["other seed"] = samples(target, lookalike(target, args.train_steps, train_real, args.cache), args.items // 4, 4242)
        foreign_sets = {"real": real, **{k: v for name, x in foreign.items()
                                         for k, v in ((name, x), (f"{name} jpeg q80", perturb(x, "jpeg q80")))}}
        scored = {name: losses(module, encoder, x, low_high) for name, x in {**own_sets, **foreign_sets}.items()}
        print(f"\n{target}: {args.items} own items per condition, {args.items} real, {args.items // 4} per other generator")
        for metric in METRICS:
            quantiles = {name: float(torch.quantile(scored[name][metric], 0.995)) for name in own_sets}
            threshold = max(quantiles.values())
            worst = max(quantiles, key=quantiles.get)
            real_q = torch.quantile(scored["real"][metric], torch.tensor([0.005, 0.01], dtype=scored["real"][metric].dtype))
            print(f"  {metric}: threshold {threshold:.3e} (set by {worst}); real 0.5% / 1% quantiles at "
                  f"{real_q[0] / threshold:.2f}x / {real_q[1] / threshold:.2f}x it")
            for name in foreign_sets:
                loss = scored[name][metric]
                print(f"    {name:28s} accepted {(loss <= threshold).double().mean():.4f}  lowest {loss.min() / threshold:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
