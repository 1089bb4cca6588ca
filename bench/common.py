"""What the benchmarks share: the generator zoo, the core-bar generators, their cached training and sample sets.

- The zoo: the paper's four GAN families (DCGAN, WGAN-GP, LSGAN, EBGAN) trained on Fashion-MNIST,
  two seeds each (``train_zoo``; sizes ``smoke``, ``cpu``, ``full``), with their 8-bit PNG sample
  sets per split. Each is a built-in architecture trained with its family's objective
  (:func:`flipad.generators.training.train_gan`); weights are cached under ``.flipad/zoo/<size>``.
- The core-bar generators (``TARGETS``): four 32x32 grey generators written as a user would (not
  the built-ins), latent vector 64 reshaped inside: final ConvTranspose2d + tanh, upsampling +
  final Conv2d + tanh, final ConvTranspose2d + sigmoid, and ConvTranspose2d + tanh with a skip
  connection into the output (FLIPAD refuses it). ``trained`` caches them under ``.flipad/bench``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save
from torch import nn

from flipad import GeneratorAdapter
from flipad.generators.architectures import DCGANGenerator, EBGANGenerator, LSGANGenerator, WGANGPGenerator
from flipad.generators.sampling import generate_samples
from flipad.generators.training import train_gan
from flipad.io.files import atomic_write
from flows.datasets import load_fashion_mnist

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
        raise FileNotFoundError(f"{path} is missing: train the zoo first (python -m bench suite)")
    _, options = FAMILIES[family]
    critic = {"critic_steps": size.critic_steps} if family == "wgan-gp" else {}
    start = time.perf_counter()
    module = train_gan(module, real, steps=size.train_steps, seed=seed, device=device, progress=False, **options, **critic)
    seconds = time.perf_counter() - start
    record = {"family": family, "seed": seed, "size": asdict(size), "training": {**options, **critic}, "train_s": round(seconds, 1),
              "torch": torch.__version__}
    atomic_write(path.with_suffix(".json"), json.dumps(record, indent=2).encode())
    return save_weights(module, path)


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


def trained(name: str, steps: int, real, cache: Path = Path(".flipad/bench"), lookalike: bool = False) -> nn.Module:
    """The core-bar generator ``name`` trained ``steps`` GAN steps on ``real`` (cached in ``cache``);
    ``lookalike``: the same architecture trained from another seed on the same data."""
    path = cache / f"{name.replace('+', '_')}{'-lookalike' if lookalike else ''}-{steps}.safetensors"
    return _cached_gan(VectorGenerator(**TARGETS[name]), path, real, steps=steps,
                       seed=len(name) + (1000 if lookalike else 0), output_range=output_range(name))


def _cached_gan(module: nn.Module, path: Path, real, **training) -> nn.Module:
    """``module`` with the weights saved at ``path``, else trained on ``real`` by ``train_gan(**training)``
    and saved there."""
    if path.is_file():
        module.load_state_dict(load_file(str(path)))
        return module.eval()
    return save_weights(train_gan(module, real, progress=False, **training), path)


def save_weights(module: nn.Module, path: Path) -> nn.Module:
    """Cache ``module``'s weights at ``path`` atomically (a run killed while writing leaves no
    truncated file for the next one to load) and return ``module``."""
    atomic_write(path, save({k: v.detach().contiguous() for k, v in module.state_dict().items()}))
    return module


def rgb_dcgan(size: int, width: int, steps: int, seed: int, real: np.ndarray, cache: Path = Path(".flipad/bench")) -> nn.Module:
    """The paper's DCGAN (latent 100, RGB) at ``size`` px and ``width``, trained ``steps`` GAN steps
    on the photo patches ``real`` from ``seed`` (cached in ``cache``)."""
    return _cached_gan(DCGANGenerator(latent_dim=100, channels=3, image_size=size, width=width),
                       cache / f"rgb{size}-w{width}-s{seed}-{steps}.safetensors", real, steps=steps, seed=seed,
                       device="cpu")


# the end line of a progress stage (flipad.progress): "NAME: done (N items, S s)"
STAGE_END = re.compile(r"(?P<stage>[^\n]*?): done \((?:[^()]*, )?(?P<seconds>[\d.]+) s\)")


def stage_seconds(log: str) -> dict[str, float]:
    """Seconds per progress stage in ``log`` (stages of the same name added up; a logger's prefix
    ending in "] " is dropped)."""
    stages: dict[str, float] = {}
    for match in STAGE_END.finditer(log):
        name = match["stage"].split("] ")[-1].strip()
        stages[name] = stages.get(name, 0.0) + float(match["seconds"])
    return stages


def timed(fn, *args, **kwargs) -> tuple:
    """``(fn(*args, **kwargs), wall seconds)``, synchronising CUDA around the call where there is one."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


# the test-size autoencoder: Stable Diffusion's VAE layout (8x latent, 4 channels, the same
# decoder tail) at 32-64-64-64 channels, one layer per block: about 1.25 M parameters
SMALL_AUTOENCODER = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
                     "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [32, 64, 64, 64],
                     "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32, "sample_size": 64}
# Stable Diffusion's VAE configuration (83.65 M parameters) at a given sample size
SD_AUTOENCODER = {**SMALL_AUTOENCODER, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
                  "sample_size": 512, "scaling_factor": 0.18215}


def saved_autoencoder(folder: Path, config: dict, real: np.ndarray | None, steps: int, seed: int = 0,
                      batch: int = 8, lr: float = 1e-3) -> Path:
    """An ``AutoencoderKL`` of ``config`` trained ``steps`` batches of ``batch`` images of ``real`` at
    learning rate ``lr`` (random weights when ``steps`` is 0) and saved with ``save_pretrained`` in
    ``folder`` (kept: reused when present)."""
    from diffusers import AutoencoderKL

    from flipad.detectors.autoencoder import train_autoencoder

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    vae = AutoencoderKL(**config)
    if steps:
        train_autoencoder(vae, real, steps, batch, seed, parameters=None, lr=lr)
    vae.save_pretrained(folder)
    return folder
