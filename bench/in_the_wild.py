"""The default verdict in the wild: own items recompressed, look-alike generators, real images.

    python bench/in_the_wild.py [--targets convT+tanh ...] [--validation 1000] [--perturbed 300]
                                [--test 200] [--search-method encoder-lm] [--encoder-steps 1000]
                                [--search-steps 600] [--search-starts 3]
                                [--perturbations "jpeg q95" "jpeg q90" ...]

For each target generator of ``bench/core_bar.py`` (trained on Fashion-MNIST, cached under
.flipad/bench) and a look-alike of it (the same architecture trained from another seed), the
reconstruction-loss detector is fitted with its thresholds calibrated on ``--validation`` pristine
samples and ``--perturbed`` samples after each of ``--perturbations`` (``--perturbations`` with
no value: pristine calibration only, the earlier behaviour). Then ``--test`` held-out items per
source are scored pristine and after JPEG q90 / q80 (a PNG of a JPEG has the same pixels as
the JPEG, so not scored twice). The search is ``flipad onboard``'s default (``encoder-lm``, its
encoder trained for ``--encoder-steps``) or ``--search-method adam`` (``--search-steps``,
``--search-starts``). Prints, per source and variant, the share attributed to the target at FNR
0.005, the loss quantiles, and the seconds per item of the search.
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

from core_bar import TARGETS, VectorGenerator, output_range, samples, trained  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from flipad import ReconstructionConfig, ReconstructionLossDetector  # noqa: E402
from flipad.detectors.base import ROBUST_PERTURBATIONS  # noqa: E402
from flipad.generators.training import train_gan  # noqa: E402
from flipad.inversion.latent import SEARCH_METHODS  # noqa: E402
from flows.datasets import load_fashion_mnist  # noqa: E402
from flipad.io.perturb import perturb  # noqa: E402

VARIANTS = ("pristine", "jpeg q90", "jpeg q80")


def lookalike(name: str, steps: int, real: np.ndarray, cache: Path) -> torch.nn.Module:
    """The target's architecture trained from another seed on the same real data (cached)."""
    module = VectorGenerator(**TARGETS[name])
    path = cache / f"{name.replace('+', '_')}-lookalike-{steps}.safetensors"
    if path.is_file():
        module.load_state_dict(load_file(str(path)))
        return module.eval()
    module = train_gan(module, real, steps=steps, seed=len(name) + 1000, output_range=output_range(name), progress=False)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="*", default=["convT+tanh"])
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--validation", type=int, default=1000)
    parser.add_argument("--perturbed", type=int, default=300)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--search-method", choices=SEARCH_METHODS, default="encoder-lm")
    parser.add_argument("--encoder-steps", type=int, default=1000)
    parser.add_argument("--search-steps", type=int, default=ReconstructionConfig.steps)
    parser.add_argument("--search-starts", type=int, default=ReconstructionConfig.starts)
    parser.add_argument("--perturbations", nargs="*", default=list(ROBUST_PERTURBATIONS))
    parser.add_argument("--cache", type=Path, default=Path(".flipad/bench"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    train_real = load_fashion_mnist("train", 32, limit=20_000)
    test_real = load_fashion_mnist("test", 32, limit=args.test)
    args.cache.mkdir(parents=True, exist_ok=True)
    search = ReconstructionConfig(steps=args.search_steps, starts=args.search_starts, method=args.search_method,
                                  encoder_steps=args.encoder_steps)
    print(f"search: {search}; calibration: {args.validation} pristine + {args.perturbed} x {args.perturbations}")
    print(f"{'target':20s} {'source':14s} {'variant':10s} {'attributed':>10s} {'loss median':>12s} {'loss 99.5%':>11s}")
    for name in args.targets:
        module = trained(name, args.train_steps, train_real, args.cache)
        start = time.perf_counter()
        det = ReconstructionLossDetector(module, module.latent_shape, n_validation=args.validation, config=search,
                                         device="cpu", progress=False, perturbations=args.perturbations,
                                         n_perturbed=args.perturbed).fit()
        fit_s = time.perf_counter() - start
        sources = {"own": samples(name, module, args.test, seed=31337), "real": test_real,
                   "lookalike": samples(name, lookalike(name, args.train_steps, train_real, args.cache), args.test, 31337)}
        scored, seconds = 0, 0.0
        for source, images in sources.items():
            for variant in VARIANTS:
                x = images if variant == "pristine" else perturb(images, variant)
                start = time.perf_counter()
                loss = det.anomaly_scores(x).numpy()
                seconds += time.perf_counter() - start
                scored += len(x)
                accepted = float((loss <= det.threshold()).mean())
                print(f"{name:20s} {source:14s} {variant:10s} {accepted:10.3f} {np.median(loss):12.2e} "
                      f"{np.quantile(loss, 0.995):11.2e}", flush=True)
        print(f"{name:20s} threshold {det.threshold():.3e}; fit {fit_s:.0f} s; {seconds / scored:.3f} s per scored item; "
              f"calibration {det.fit_info_['perturbations']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
