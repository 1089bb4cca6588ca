"""The generator zoo: the paper's four GAN families trained on Fashion-MNIST, two seeds each.

    python bench/zoo.py [--size cpu|full|smoke] [--cache .flipad/zoo]

Each generator is a built-in architecture (``flipad.architectures``) trained with its family's
objective (``flipad.generators.training.train_gan``): DCGAN (non-saturating loss), WGAN-GP (Wasserstein loss
with gradient penalty, 2 critic steps per generator step on CPU, 5 at the full size), LSGAN
(least squares), EBGAN (autoencoder energy with a margin). Initialisation and training are seeded,
so a checkpoint is reproduced bit for bit on the CPU from its family, seed and size (same torch
version); the weights are cached as safetensors with a JSON record of how they were made, and
8-bit PNG sample sets (train / val / test) are written beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flipad import GeneratorAdapter  # noqa: E402
from flipad.generators.architectures import DCGANGenerator, EBGANGenerator, LSGANGenerator, WGANGPGenerator  # noqa: E402
from flows.datasets import load_fashion_mnist  # noqa: E402
from flipad.generators.training import train_gan  # noqa: E402

FAMILIES = {
    "dcgan": (DCGANGenerator, dict(loss="bce")),
    "wgan-gp": (WGANGPGenerator, dict(loss="wgan-gp", lr=1e-4)),
    "lsgan": (LSGANGenerator, dict(loss="lsgan")),
    "ebgan": (EBGANGenerator, dict(loss="ebgan")),
}
SEEDS = (0, 1)
SPLITS = {"train": 1, "val": 2, "test": 3}  # sample seeds per split (offset by 1000 x generator seed)


@dataclass(frozen=True)
class ZooSize:
    """How large the zoo's generators are and how long they train."""

    image_size: int
    width: int
    latent_dim: int
    train_steps: int
    critic_steps: int  # WGAN-GP only
    train_images: int  # real images the GANs train on (the start of the training split)
    samples_per_split: int  # PNGs written per split and generator by default


ZOO_SIZES = {
    "smoke": ZooSize(image_size=32, width=8, latent_dim=16, train_steps=2, critic_steps=1, train_images=256, samples_per_split=8),
    "cpu": ZooSize(image_size=32, width=16, latent_dim=64, train_steps=500, critic_steps=2, train_images=20_000, samples_per_split=200),
    "full": ZooSize(image_size=64, width=64, latent_dim=100, train_steps=10_000, critic_steps=5, train_images=60_000, samples_per_split=1000),
}


def generator_name(family: str, seed: int) -> str:
    return f"{family}-s{seed}"


def build(family: str, seed: int, size: ZooSize) -> nn.Module:
    """The untrained generator, initialised from ``seed``."""
    torch.manual_seed(seed)
    cls, _ = FAMILIES[family]
    return cls(latent_dim=size.latent_dim, channels=1, image_size=size.image_size, width=size.width)


def zoo_generator(family: str, seed: int, size: ZooSize, cache: Path, real: np.ndarray | None, device: str = "cpu") -> nn.Module:
    """The trained generator: loaded from ``cache`` or trained on ``real`` (and then cached)."""
    path = cache / f"{generator_name(family, seed)}.safetensors"
    module = build(family, seed, size)
    if path.is_file():
        module.load_state_dict(load_file(str(path)))
        return module.eval()
    if real is None:
        raise FileNotFoundError(f"{path} is missing: train the zoo first (python bench/zoo.py)")
    _, options = FAMILIES[family]
    critic = {"critic_steps": size.critic_steps} if family == "wgan-gp" else {}
    start = time.perf_counter()
    module = train_gan(module, real, steps=size.train_steps, seed=seed, device=device, progress=False, **options, **critic)
    seconds = time.perf_counter() - start
    cache.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    record = {"family": family, "seed": seed, "size": asdict(size), "training": {**options, **critic}, "train_s": round(seconds, 1),
              "torch": torch.__version__}
    path.with_suffix(".json").write_text(json.dumps(record, indent=2))
    return module


def write_sample_sets(adapter: GeneratorAdapter, folder: Path, seed: int, counts: dict[str, int]) -> None:
    """8-bit PNGs of the generator, one folder per split (``counts`` images), each from its own latent seed."""
    for split, offset in SPLITS.items():
        out = folder / split
        if out.is_dir() and len(list(out.glob("*.png"))) >= counts[split]:
            continue
        out.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(adapter.generate(counts[split], seed=1000 * seed + offset)):
            Image.fromarray(image[0]).save(out / f"{i:05d}.png")


def train_zoo(size_name: str, cache: Path, device: str = "cpu", counts: dict[str, int] | None = None) -> dict[str, GeneratorAdapter]:
    """Every generator of the zoo (trained if missing), with its PNG sample sets (``counts`` per
    split, default the size's ``samples_per_split``), as adapters."""
    size = ZOO_SIZES[size_name]
    counts = counts or dict.fromkeys(SPLITS, size.samples_per_split)
    real = None
    adapters = {}
    for family in FAMILIES:
        for seed in SEEDS:
            name = generator_name(family, seed)
            if real is None and not (cache / f"{name}.safetensors").is_file():
                real = load_fashion_mnist("train", size.image_size, limit=size.train_images)
            module = zoo_generator(family, seed, size, cache, real, device)
            adapters[name] = GeneratorAdapter.from_module(module, device=device)
            write_sample_sets(adapters[name], cache / "samples" / name, seed, counts)
    return adapters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=tuple(ZOO_SIZES), default="cpu")
    parser.add_argument("--cache", type=Path, help="default: .flipad/zoo/<size>")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    cache = args.cache or Path(".flipad/zoo") / args.size
    start = time.perf_counter()
    adapters = train_zoo(args.size, cache, args.device)
    print(f"{len(adapters)} generators in {cache} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
