"""The reconstruction family's latent search: own samples' loss tail against look-alike generators.

    python bench/search_config.py [--items 80] [--variants previous default ...]

On the core-bar generators (``bench/core_bar.py``, trained and cached under .flipad/bench on the
first run), the target convT+tanh reconstructs ``--items`` of its own fresh 8-bit samples, as
many of each look-alike (upsample+conv+tanh, convT+sigmoid) and as many real Fashion-MNIST test
images, with each search setting in turn. Prints seconds per item, the own losses' quantiles,
and the fraction of each other source above the own losses' 99.5% quantile (the FNR 0.005
threshold, estimated on the same own items).
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

from core_bar import TARGETS, trained  # noqa: E402

from flipad.io.data import quantize  # noqa: E402
from flows.datasets import load_fashion_mnist  # noqa: E402
from flipad.inversion.latent import ReconstructionConfig, reconstruction_losses  # noqa: E402

# the Adam search's settings ("default": today's), each scored in the MSE they were measured in
VARIANTS = {
    "previous": ReconstructionConfig(steps=300, candidates=3, metric="mse"),  # the default until 2026-11-23
    "300 screened": ReconstructionConfig(steps=300, metric="mse"),
    "600 unscreened": ReconstructionConfig(candidates=3, metric="mse"),
    "default": ReconstructionConfig(metric="mse"),
}


def _samples(module: torch.nn.Module, n: int, seed: int, out_range: tuple[float, float]) -> torch.Tensor:
    with torch.no_grad():
        x = module(torch.randn(n, 64, generator=torch.Generator().manual_seed(seed)))
    return torch.as_tensor(quantize(x, *out_range)).float().div(255) * 2 - 1  # 8-bit, in the target's tanh range


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=80)
    parser.add_argument("--variants", nargs="*", choices=tuple(VARIANTS), default=["previous", "default"])
    parser.add_argument("--cache", type=Path, default=Path(".flipad/bench"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    real = None if all((args.cache / f"{n.replace('+', '_')}-1500.safetensors").is_file() for n in TARGETS) else \
        load_fashion_mnist("train", 32, limit=20_000)
    modules = {name: trained(name, 1500, real, args.cache) for name in TARGETS}
    target = modules["convT+tanh"]
    n = args.items
    sets = {
        "own": _samples(target, n, 777, (-1.0, 1.0)),
        "upsample+conv+tanh": _samples(modules["upsample+conv+tanh"], n, 778, (-1.0, 1.0)),
        "convT+sigmoid": _samples(modules["convT+sigmoid"], n, 779, (0.0, 1.0)),
        "real": torch.as_tensor(load_fashion_mnist("test", 32, limit=n)).float().div(255) * 2 - 1,
    }
    print(f"target convT+tanh, {n} items per source, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name in args.variants:
        start = time.perf_counter()
        losses = {k: reconstruction_losses(target, (64,), v, VARIANTS[name], (-1.0, 1.0)).numpy() for k, v in sets.items()}
        per_item = (time.perf_counter() - start) / (len(sets) * n)
        own = losses["own"]
        threshold = np.quantile(own, 0.995)
        q50, q90, q99 = np.quantile(own, [0.5, 0.9, 0.99])
        rejected = ", ".join(f"{k} {np.mean(v > threshold):.3f}" for k, v in losses.items() if k != "own")
        print(f"{name:15s} {per_item:.3f} s/item; own loss median {q50:.2e}, 90% {q90:.2e}, 99% {q99:.2e}; "
              f"rejected above own 99.5%: {rejected}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
