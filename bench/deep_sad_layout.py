"""Deep SAD training time in the two memory layouts, same features, same run.

    python bench/deep_sad_layout.py [--samples 1000] [--epochs 5] [--threads 2]

Trains the LeNet-style Deep SAD encoder on random features of the two shapes the benchmark
suite meets (RAWPAD/DCTPAD: 1x32x32 images; FLIPAD: 16x16x16 activations of the zoo's DCGAN),
half labelled as the generator's, half as negatives, once with ``channels_last=False`` (PyTorch's
default layout) and once with ``channels_last=True`` (flipad's default), alternating the order
over ``--rounds`` rounds; prints the median seconds per epoch of each and the ratio, and the
largest score difference between the two trained networks (the same network and loss: only
floating-point summation order differs).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flipad.detectors.deepsad import DeepSADConfig, DeepSADTrainer  # noqa: E402

SHAPES = {"raw/dct 1x32x32": (1, 32, 32), "flipad 16x16x16": (16, 16, 16)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.samples} samples, {args.epochs} epochs, batch 128, {args.rounds} rounds")
    print(f"{'features':18s} {'default s/epoch':>15s} {'channels_last s/epoch':>21s} {'speed-up':>8s} {'max |score diff|':>16s}")
    for label, shape in SHAPES.items():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.samples, *shape, generator=gen)
        labels = torch.where(torch.arange(args.samples) % 2 == 0, 1, -1)
        base = DeepSADConfig(epochs=args.epochs, seed=0)
        times: dict[bool, list[float]] = {False: [], True: []}
        scores = {}
        for round_ in range(args.rounds):
            for layout in (False, True) if round_ % 2 == 0 else (True, False):
                trainer = DeepSADTrainer(replace(base, channels_last=layout), torch.device("cpu"))
                start = time.perf_counter()
                net, center = trainer.fit(x, labels, progress=False)
                times[layout].append((time.perf_counter() - start) / args.epochs)
                scores[layout] = trainer.distances(net, center, x)
        default, fast = statistics.median(times[False]), statistics.median(times[True])
        diff = (scores[False] - scores[True]).abs().max().item()
        print(f"{label:18s} {default:15.3f} {fast:21.3f} {default / fast:7.2f}x {diff:16.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
