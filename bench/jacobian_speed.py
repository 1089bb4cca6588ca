"""Bench: the latent search's Jacobian, by forward differences and by bfloat16 tangents.

    python bench/jacobian_speed.py [--items 128] [--repeats 3] [--train-steps 1500]

For each core-bar generator (``bench/core_bar.py``, same cache), on the channels-last copy the
search runs (:func:`flipad.device.search_layout`): milliseconds per item of a Jacobian by forward
differences (:func:`flipad.inversion.amortised.jacobian`) and by tangent propagation
(:class:`flipad.inversion.tangents.TangentJacobian`), timed alternately in the same run (two
rounds each, the faster kept), each one's relative (Frobenius) error against the exact Jacobian
(forward-mode differentiation in float64), and which one :func:`~flipad.inversion.tangents.search_jacobian` picks.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from core_bar import TARGETS, trained  # noqa: E402

from flipad.device import search_layout  # noqa: E402
from flipad.inversion.amortised import jacobian  # noqa: E402
from flipad.inversion.tangents import TangentJacobian, search_jacobian  # noqa: E402
from flows.datasets import load_fashion_mnist  # noqa: E402


def ms_per_item(take: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, repeats: int) -> float:
    take(z)
    start = time.perf_counter()
    for _ in range(repeats):
        take(z)
    return (time.perf_counter() - start) / repeats / len(z) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--cache", type=Path, default=Path(".flipad/bench"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    real = load_fashion_mnist("train", 32, limit=20_000)  # trains the generators not cached yet
    print(f"{'generator':20s} {'differences':>12s} {'tangents':>10s} {'speed-up':>9s} {'err diff':>9s} {'err tang':>9s}  picked")
    for name in TARGETS:
        generator = trained(name, args.train_steps, real, args.cache).eval()
        module = search_layout(generator, generator.latent_shape)
        z = torch.randn(args.items, *module.latent_shape, generator=torch.Generator().manual_seed(0))
        tangents = TangentJacobian(module)
        with torch.no_grad():
            differences = [ms_per_item(lambda x: jacobian(module, x), z, args.repeats) for _ in range(2)]
            propagated = [ms_per_item(tangents, z, args.repeats) for _ in range(2)]
            exact_module = copy.deepcopy(module).double()
            exact = torch.func.vmap(torch.func.jacfwd(lambda zi: exact_module(zi[None])[0].flatten()))(z[:16].double())
            err_diff = float((jacobian(module, z[:16]).double() - exact).norm() / exact.norm())
            err_tang = float((tangents(z[:16]).double() - exact).norm() / exact.norm())
        a, b = min(differences), min(propagated)
        picked = search_jacobian(module, module.latent_shape).name
        print(f"{name:20s} {a:9.2f} ms {b:7.2f} ms {a / b:8.2f}x {err_diff:9.4f} {err_tang:9.4f}  {picked}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
