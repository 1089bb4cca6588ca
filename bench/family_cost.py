"""Seconds per item of each detector family and of the combined verdict, measured in one run.

Fits an ``AttributionDetector`` (FLIPAD + reconstruction loss, the product's settings: the
encoder-lm search) for one of the core-bar generators (:mod:`bench.common`), then scores the same mixed set (``--items`` each of the
target's own new samples, real Fashion-MNIST test images and another generator's samples) three
ways: FLIPAD alone (final-layer inversion + Deep SAD), the reconstruction-loss search alone, and
the combined verdict (which searches only items FLIPAD does not already reject). Prints seconds
per item and the fraction of items the combined verdict searched.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np
import torch

from flipad import AttributionDetector, DetectorSettings, ReconstructionLossDetector, family_settings
from flows.datasets import load_fashion_mnist

from .common import TARGETS, samples, timed, trained
from .report import Benchmark, markdown_table


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench family_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=200, help="items per source (own, real, other generator)")
    parser.add_argument("--target", choices=list(TARGETS), default="convT+tanh")
    parser.add_argument("--other", choices=list(TARGETS), default="upsample+conv+tanh")
    parser.add_argument("--samples", type=int, default=1000, help="generator samples and real images to fit FLIPAD on")
    parser.add_argument("--calibration", type=int, default=300, help="generator samples per held-out calibration set")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--cache", type=Path, default=Path(".flipad/bench"))
    parser.add_argument("--encoder-steps", type=int, default=ReconstructionLossDetector.Settings.encoder_steps)
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(2)
    train_real = load_fashion_mnist("train", 32, limit=20_000)
    test_real = load_fashion_mnist("test", 32, limit=args.items)
    module = trained(args.target, args.train_steps, train_real, args.cache)
    other = samples(args.other, trained(args.other, args.train_steps, train_real, args.cache), args.items, seed=31337)

    settings = DetectorSettings(fnr=(0.005,), n_generated=args.samples, n_validation=args.calibration,
                                n_calibration=args.calibration, device=args.device, progress=False,
                                families=family_settings({"reconstruction": {"encoder_steps": args.encoder_steps}}))
    det, fit_s = timed(AttributionDetector.from_settings(module, None, settings).fit, real=train_real[-args.samples:])
    own = det.reconstruction_.generate(args.items, seed=31337)
    mixed = np.concatenate([own, test_real, other])
    n = len(mixed)
    rows = []
    if det.flipad_ is not None:  # None: the final-layer adapter refused the target (a skip connection into the output)
        rows.append(("FLIPAD", timed(det.flipad_.score, mixed)[1]))
    rows.append(("reconstruction loss (settled verdict)", timed(det.reconstruction_.score, mixed)[1]))
    verdict, combined_s = timed(det.predict, mixed)
    rows.append(("combined verdict", combined_s))
    searched = det.last_searched_fraction_
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({platform.processor() or 'x86_64'}, 2 threads)"
    print(f"target {args.target}; {n} items ({args.items} own, real, {args.other}); device {device}; "
          f"torch {torch.__version__}")
    print(f"fit ({' + '.join(det.fit_info_['families'])}; FLIPAD {args.samples}+{args.samples}, "
          f"calibration {args.calibration}+{args.calibration}): {fit_s:.0f} s")
    print(f"{'family':28s} {'s/item':>8s} {'items/s':>8s}")
    for name, seconds in rows:
        print(f"{name:28s} {seconds / n:8.4f} {n / seconds:8.1f}")
    attributed = {"own": float(verdict[:args.items].mean()), "real": float(verdict[args.items:2 * args.items].mean()),
                  "other": float(verdict[2 * args.items:].mean())}
    print(f"combined verdict searched {searched:.1%} of the items; attributed: "
          + ", ".join(f"{k} {v:.3f}" for k, v in attributed.items()))
    return {"target": args.target, "other": args.other, "items": n, "device": device, "fit_s": fit_s,
            "families": det.fit_info_["families"], "searched_fraction": searched, "attributed": attributed,
            "rows": [{"scoring": name, "s per item": seconds / n, "items per s": n / seconds} for name, seconds in rows]}


def render(figures: dict) -> str:
    attributed = ", ".join(f"{k} {v:.3f}" for k, v in figures["attributed"].items())
    return (f"Target {figures['target']}, {figures['items']} items (own, real, {figures['other']}) on "
            f"{figures['device']}; fit ({' + '.join(figures['families'])}) {figures['fit_s']:.0f} s. The combined "
            f"verdict searched {figures['searched_fraction']:.1%} of the items; attributed: {attributed}.\n\n"
            + markdown_table(figures["rows"], formats={"s per item": ".4f", "items per s": ".1f"}))


def headline(figures: dict) -> list[str]:
    return [f"Cost per item on {figures['device']}: " + ", ".join(
        f"{r['scoring']} {r['s per item'] * 1000:.1f} ms" for r in figures["rows"])]


BENCHMARK = Benchmark("family_cost", __doc__, run, render, headline,
                      quick=("--items", "10", "--samples", "40", "--calibration", "40", "--train-steps", "10",
                             "--encoder-steps", "20"))
