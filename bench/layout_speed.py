"""Bench: the generator's memory layout in the latent search, and what it buys.

    python bench/layout_speed.py [--batch 512] [--repeats 20] [--train-steps 1500]

For each core-bar generator (``bench/core_bar.py``, same cache), the seconds per forward pass of a
batch of latents (the Jacobian's batch size) with the module as it is and with the copy
:func:`flipad.device.search_layout` gives the search (channels-last weights on the CPU), timed
alternately in the same run (two rounds each), and the largest difference between their outputs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from core_bar import TARGETS, trained  # noqa: E402

from flipad.device import search_layout  # noqa: E402
from flows.datasets import load_fashion_mnist  # noqa: E402


def seconds_per_item(module: torch.nn.Module, z: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(2):
            module(z)
        start = time.perf_counter()
        for _ in range(repeats):
            module(z)
    return (time.perf_counter() - start) / repeats / len(z)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--cache", type=Path, default=Path(".flipad/bench"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    real = load_fashion_mnist("train", 32, limit=20_000)  # trains the generators not cached yet
    print(f"{'generator':20s} {'as it is':>12s} {'search layout':>14s} {'speed-up':>9s} {'max |diff|':>11s}")
    for name in TARGETS:
        module = trained(name, args.train_steps, real, args.cache).eval()
        fast = search_layout(module, module.latent_shape)
        z = torch.randn(args.batch, *module.latent_shape, generator=torch.Generator().manual_seed(0))
        plain, laid = [], []
        for _ in range(2):
            plain.append(seconds_per_item(module, z, args.repeats))
            laid.append(seconds_per_item(fast, z, args.repeats))
        with torch.no_grad():
            diff = float((module(z) - fast(z)).abs().max())
        a, b = min(plain), min(laid)
        print(f"{name:20s} {a * 1e6:9.1f} us {b * 1e6:11.1f} us {a / b:8.2f}x {diff:11.1e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
