"""The core's accuracy on generators the library has never seen, per detector family.

The four core-bar generators (:mod:`bench.common`: 32x32 grey, latent vector 64 reshaped inside,
written as a user would) are trained on Fashion-MNIST (cached), onboarded through the Python API
with ``--samples`` of their 8-bit samples and as many real images, and evaluated on ``--test``
held-out samples of themselves against as many held-out real images and samples of each other
generator: balanced accuracy at FNR 0.005, AUC, fit seconds and seconds per scored item.
``--family`` picks FLIPAD, the reconstruction-loss detector, or the combined verdict (one search
over every item gives each family's own figures too). FLIPAD refuses the skip-connection
generator; the combined verdict then uses reconstruction loss alone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from flipad import AttributionDetector, FlipadDetector, GeneratorAdapter, ReconstructionLossDetector
from flipad.detectors.evaluation import evaluate_pairs, evaluate_scores
from flipad.detectors.features import DETECTOR_INVERSION, FeatureConfig
from flipad.detectors.negatives import perturbed_samples
from flows.datasets import load_fashion_mnist

from .common import REFUSED, TARGETS, samples, trained
from .report import Benchmark, markdown_table


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench core_bar", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    rows: list[dict] = []

    def row(target: str, family: str, pair, fit_s: float, per_item: float) -> None:
        rows.append({"target": target, "family": family, "other source": pair.source,
                     "balanced accuracy": pair.balanced_accuracy, "AUC": pair.auc, "fit s": fit_s, "s per item": per_item})
        print(f"{target:20s} {family[:6] + ' ' + pair.source:20s} {pair.balanced_accuracy:18.4f} {pair.auc:6.3f} "
              f"{fit_s:6.0f} {per_item:7.3f}", flush=True)

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
                for pair in evaluate_scores(part.thresholds, scores["own"][family],
                                            {o: scores[o][family] for o in others}):
                    row(name, family, pair, fit_s, per_item)
            continue
        pairs = evaluate_pairs(det, test_sets[name], others)
        per_item = (time.perf_counter() - start) / (args.test * (1 + len(others)))
        for pair in pairs:
            row(name, args.family, pair, fit_s, per_item)
    return {"family": args.family, "samples": args.samples, "test": args.test, "train_steps": args.train_steps,
            "rows": rows}


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


def render(figures: dict) -> str:
    return (f"Family {figures['family']}; {figures['samples']} training samples, {figures['test']} test items per "
            f"source, generators trained {figures['train_steps']} steps.\n\n"
            + markdown_table(figures["rows"], formats={"fit s": ".0f", "balanced accuracy": ".4f"}))


def headline(figures: dict) -> list[str]:
    rows = [r for r in figures["rows"] if r["family"] == figures["family"]]
    if not rows:
        return []
    worst = min(rows, key=lambda r: r["balanced accuracy"])
    return [f"Core bar, {figures['family']} on four unseen 32x32 generators: worst balanced accuracy "
            f"{worst['balanced accuracy']:.4f} ({worst['target']} against {worst['other source']})"]


BENCHMARK = Benchmark("core_bar", __doc__, run, render, headline,
                      quick=("--train-steps", "10", "--samples", "40", "--test", "20", "--targets", "convT+tanh",
                             "--calibration", "40"))
