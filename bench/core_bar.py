"""The core's accuracy bar on generators the library has never seen.

    python bench/core_bar.py [--train-steps 1500] [--samples 2000] [--test 1000]
                             [--family flipad|reconstruction|combined] [--calibration 1000]
                             [--solver fista|auto] [--gap-tol 1e-3]

Four 32x32 grayscale generators, latent vector 64 reshaped inside the module, written here as a
user would (not the built-ins): final ConvTranspose2d + tanh, upsampling + final Conv2d + tanh,
final ConvTranspose2d + sigmoid, and final ConvTranspose2d + tanh with a skip connection into the
output (which the final-layer adapter refuses: FLIPAD skips it, the combined verdict falls back to
reconstruction loss). Each is trained on Fashion-MNIST (weights cached under .flipad/bench),
onboarded through the Python API with 2,000 of its 8-bit samples and 2,000 real images, and
evaluated on 1,000 held-out samples of itself against 1,000 held-out real images and 1,000
samples of each other generator. Prints balanced accuracy at FNR 0.005, AUC, fit time and
seconds per scored test item (for the combined verdict: the full search on every item, which
also yields each family's own figures). ``--family`` picks FLIPAD (default), the reconstruction-loss
detector, or the combined verdict (``AttributionDetector``; ``--calibration`` generator samples
for each of its two held-out sets).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flipad import AttributionDetector, FlipadDetector, GeneratorAdapter, ReconstructionLossDetector  # noqa: E402
from flows.datasets import load_fashion_mnist  # noqa: E402
from flipad.detectors.evaluation import evaluate_pairs, evaluate_scores  # noqa: E402
from flipad.detectors.features import DETECTOR_INVERSION, FeatureConfig  # noqa: E402
from flipad.detectors.negatives import perturbed_samples  # noqa: E402
from flipad.generators.sampling import generate_samples  # noqa: E402
from flipad.generators.training import train_gan  # noqa: E402


class VectorGenerator(nn.Module):
    """Latent vector 64 -> Linear -> 4x4 map -> two x2 blocks -> a last x2 block of the chosen kind."""

    def __init__(self, last: str = "convt", activation: str = "tanh", skip: bool = False):
        super().__init__()
        self.latent_shape = (64,)
        self.fc = nn.Sequential(nn.Linear(64, 128 * 16), nn.BatchNorm1d(128 * 16), nn.ReLU())
        self.blocks = nn.Sequential(
            nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
        )
        if last == "convt":
            self.out = nn.ConvTranspose2d(32, 1, 4, 2, 1)
        else:
            self.out = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(32, 1, 3, 1, 1))
        # a skip connection into the output: the 16x16 features, upsampled and projected, are added to
        # the last layer's output, so the final-layer adapter refuses this generator
        self.skip = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(32, 1, 1)) if skip else None
        self.act = nn.Tanh() if activation == "tanh" else nn.Sigmoid()

    def forward(self, z):
        h = self.blocks(self.fc(z).view(-1, 128, 4, 4))
        out = self.out(h)
        return self.act(out if self.skip is None else out + self.skip(h))


TARGETS = {
    "convT+tanh": dict(last="convt", activation="tanh"),
    "upsample+conv+tanh": dict(last="conv", activation="tanh"),
    "convT+sigmoid": dict(last="convt", activation="sigmoid"),
    "convT+skip+tanh": dict(last="convt", activation="tanh", skip=True),
}
REFUSED = {"convT+skip+tanh"}  # FLIPAD cannot invert it: the combined verdict falls back to reconstruction loss


def output_range(name: str) -> tuple[float, float]:
    return (0.0, 1.0) if TARGETS[name]["activation"] == "sigmoid" else (-1.0, 1.0)


def samples(name: str, module: nn.Module, n: int, seed: int) -> np.ndarray:
    """``n`` 8-bit samples of a target (the latents ``GeneratorAdapter.generate`` draws for ``seed``)."""
    return generate_samples(module, module.latent_shape, n, seed, output_range(name))


def trained(name: str, steps: int, real, cache: Path) -> nn.Module:
    module = VectorGenerator(**TARGETS[name])
    path = cache / f"{name.replace('+', '_')}-{steps}.safetensors"
    if path.is_file():
        module.load_state_dict(load_file(str(path)))
        return module.eval()
    module = train_gan(module, real, steps=steps, seed=len(name), output_range=output_range(name), progress=False)
    cache.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--cache", type=Path, default=Path(".flipad/bench"))
    parser.add_argument("--targets", nargs="*", default=list(TARGETS))
    parser.add_argument("--bounded", action="store_true", help="constrain the inversion to the penultimate range")
    parser.add_argument("--censored", action="store_true", help="saturated pixels as inequalities")
    parser.add_argument("--solver", choices=("fista", "auto"), default="fista",
                        help="the features' inversion: the detector default (FISTA, 600 iterations) or invert()'s auto")
    parser.add_argument("--gap-tol", type=float, default=1e-3, help="with --solver auto: the interior method's gap")
    parser.add_argument("--perturbed", type=int, default=0, help="extra negatives from perturbed copies of the target")
    parser.add_argument("--perturb-scale", type=float, default=0.2)
    parser.add_argument("--family", choices=("flipad", "reconstruction", "combined"), default="flipad")
    parser.add_argument("--calibration", type=int, default=1000, help="held-out generator samples per calibration set")
    args = parser.parse_args(argv)
    inversion = {"method": "auto", "gap_tol": args.gap_tol} if args.solver == "auto" else DETECTOR_INVERSION
    features = FeatureConfig(bounded=args.bounded, censored=args.censored, inversion=dict(inversion))
    print(f"features: {features}")
    torch.set_num_threads(2)
    train_real = load_fashion_mnist("train", 32, limit=20_000)
    test_real = load_fashion_mnist("test", 32, limit=args.test)
    modules = {name: trained(name, args.train_steps, train_real, args.cache) for name in TARGETS}
    test_sets = {name: samples(name, module, args.test, seed=31337) for name, module in modules.items()}
    print(f"family: {args.family}")
    print(f"{'target':20s} {'other source':20s} {'bal. acc @FNR .005':>18s} {'AUC':>6s} {'fit s':>6s} {'s/item':>7s}")
    for name in args.targets:
        if args.family == "flipad" and name in REFUSED:
            print(f"{name:20s} refused by the final-layer adapter: use --family reconstruction or combined")
            continue
        start = time.perf_counter()
        adapter = None if name in REFUSED else GeneratorAdapter.from_module(modules[name], device="cpu")
        negatives = perturbed_samples(adapter, args.perturbed, args.perturb_scale) if args.perturbed else None
        det = detector(args, modules[name], adapter, features)
        det.fit(real=train_real[-args.samples :], negatives=negatives)
        fit_s = time.perf_counter() - start
        others = {"real": test_real, **{o: s for o, s in test_sets.items() if o != name}}
        start = time.perf_counter()
        if args.family == "combined":  # every family's pairs from one search over every item
            scores = {source: det.family_scores(x) for source, x in {"own": test_sets[name], **others}.items()}
            per_item = (time.perf_counter() - start) / (args.test * (1 + len(others)))
            for family in scores["own"]:  # no "flipad" where the adapter refuses the generator
                part = det if family == "combined" else getattr(det, f"{family}_")
                pairs = evaluate_scores(part.thresholds_, scores["own"][family].numpy(),
                                        {o: scores[o][family].numpy() for o in others})
                for pair in pairs:
                    print(f"{name:20s} {family[:6] + ' ' + pair.source:20s} {pair.balanced_accuracy:18.4f} "
                          f"{pair.auc:6.3f} {fit_s:6.0f} {per_item:7.3f}")
            print(f"{name:20s} fit: {det.fit_info_}", flush=True)
            continue
        pairs = evaluate_pairs(det, test_sets[name], others)
        per_item = (time.perf_counter() - start) / (args.test * (1 + len(others)))
        for pair in pairs:
            print(f"{name:20s} {pair.source:20s} {pair.balanced_accuracy:18.4f} {pair.auc:6.3f} {fit_s:6.0f} {per_item:7.3f}")
        print(f"{name:20s} fit: {det.fit_info_}", flush=True)
    return 0


def detector(args, module: nn.Module, adapter: GeneratorAdapter | None, features: FeatureConfig):
    """The detector of the chosen family for one target (FNR 0.005, 2 CPU threads)."""
    if args.family == "flipad":
        return FlipadDetector(adapter, features=features, n_generated=args.samples, progress=False)
    if args.family == "reconstruction":
        return ReconstructionLossDetector(module, module.latent_shape, n_validation=args.calibration,
                                          device="cpu", progress=False)
    return AttributionDetector(module, module.latent_shape, n_validation=args.calibration,
                               n_calibration=args.calibration, device="cpu", progress=False,
                               flipad_options={"features": features, "n_generated": args.samples})


if __name__ == "__main__":
    raise SystemExit(main())
