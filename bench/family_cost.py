"""Seconds per item of each detector family and of the combined verdict, measured in one run.

    python bench/family_cost.py [--items 200] [--device cpu|cuda] [--target convT+tanh]

Fits an ``AttributionDetector`` (FLIPAD + reconstruction loss) for one of ``bench/core_bar.py``'s
generators (trained and cached as there), then scores the same mixed set (``--items`` each of the
target's own new samples, real Fashion-MNIST test images and another generator's samples) three
ways: FLIPAD alone (final-layer inversion + Deep SAD), the reconstruction-loss search alone, and
the combined verdict (which searches only items FLIPAD does not already reject). Prints seconds
per item and the fraction of items the combined verdict searched.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from core_bar import TARGETS, samples, trained  # noqa: E402

from flipad import AttributionDetector  # noqa: E402
from flows.datasets import load_fashion_mnist  # noqa: E402


def timed(fn, *args, **kwargs):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=200, help="items per source (own, real, other generator)")
    parser.add_argument("--target", choices=list(TARGETS), default="convT+tanh")
    parser.add_argument("--other", choices=list(TARGETS), default="upsample+conv+tanh")
    parser.add_argument("--samples", type=int, default=1000, help="generator samples and real images to fit FLIPAD on")
    parser.add_argument("--calibration", type=int, default=300, help="generator samples per held-out calibration set")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--cache", type=Path, default=Path(".flipad/bench"))
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(2)
    train_real = load_fashion_mnist("train", 32, limit=20_000)
    test_real = load_fashion_mnist("test", 32, limit=args.items)
    module = trained(args.target, args.train_steps, train_real, args.cache)
    other = samples(args.other, trained(args.other, args.train_steps, train_real, args.cache), args.items, seed=31337)

    det, fit_s = timed(AttributionDetector(module, fnr=(0.005,), n_validation=args.calibration, n_calibration=args.calibration,
                                           flipad_options={"n_generated": args.samples}, device=args.device,
                                           progress=False).fit, real=train_real[-args.samples:])
    own = det.reconstruction_.generate(args.items, seed=31337)
    mixed = np.concatenate([own, test_real, other])
    n = len(mixed)
    rows = []
    if det.flipad_ is not None:  # None: the final-layer adapter refused the target (a skip connection into the output)
        rows.append(("FLIPAD", timed(det.flipad_.anomaly_scores, mixed)[1]))
    rows.append(("reconstruction loss", timed(det.reconstruction_.anomaly_scores, mixed)[1]))
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
    print(f"combined verdict searched {searched:.1%} of the items; attributed: own {verdict[:args.items].mean():.3f}, "
          f"real {verdict[args.items:2 * args.items].mean():.3f}, other {verdict[2 * args.items:].mean():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
