"""Keyed sampling: distribution-preserving keys (flipad.keys) against Nie et al.'s direction keys.

    python bench/keys.py [--recipients 1000] [--items 300] [--unkeyed 8000] [--foreign 1000]
                         [--encoder-steps 1000]

On the demo's shipped generator (32x32 grey DCGAN, latent 64), with its latent search's encoder
trained for ``--encoder-steps`` batches (the onboarding default is 1,000): ``--items`` keyed
samples, each for a recipient drawn among ``--recipients``, by each scheme, decoded pristine and
after JPEG q90 / q80 / q60 and WebP q80; and ``--unkeyed`` unkeyed samples and ``--foreign``
each of the look-alike (the other-seed demo generator) and real Fashion-MNIST images, inverted
once and matched against every key of both schemes. Prints per scheme and variant the bit accuracy, the recipient accuracy, wrong recipients,
false matches, and the seconds per item to decode on one thread; then the quality cost: the
5-fold accuracy of a logistic-regression classifier telling 2,000 keyed images from 2,000
unkeyed ones (0.5: no difference) and the Frechet distance between them in a 64-component PCA
of the pixels (beside the distance between two unkeyed sets, the noise floor).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flipad.generators.sampling import generate_samples  # noqa: E402
from flipad.inversion.amortised import train_encoder  # noqa: E402
from flipad.inversion.tangents import search_jacobian  # noqa: E402
from flipad.io.data import decode_image  # noqa: E402
from flipad.keys import DirectionKey, KeySet, KeyedSampler, invert  # noqa: E402
from flows.datasets import load_fashion_mnist  # noqa: E402
from flows.demo import DEMO_LATENT, demo_generator  # noqa: E402

RANGE = (-1.0, 1.0)
SECRET = b"flipad bench master secret, 32b"


def _reencode(images: np.ndarray, fmt: str, quality: int) -> np.ndarray:
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image[0]).save(buffer, format=fmt, quality=quality)
        out.append(decode_image(buffer.getvalue(), 1))
    return np.stack(out)


VARIANTS = {"pristine": lambda x: x, "jpeg q90": lambda x: _reencode(x, "JPEG", 90),
            "jpeg q80": lambda x: _reencode(x, "JPEG", 80), "jpeg q60": lambda x: _reencode(x, "JPEG", 60),
            "webp q80": lambda x: _reencode(x, "WEBP", 80)}


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to the rows of ``a`` and ``b``."""
    mu, nu = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(sa @ sb).real
    return float(((mu - nu) ** 2).sum() + np.trace(sa + sb - 2 * root))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipients", type=int, default=1000)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--unkeyed", type=int, default=8000)
    parser.add_argument("--foreign", type=int, default=1000)
    parser.add_argument("--encoder-steps", type=int, default=1000)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    train = load_fashion_mnist("train", 32, limit=20_000)
    generator, _ = demo_generator(Path(".flipad/bench/demo"), 0, 1000, train, "cpu")
    other, _ = demo_generator(Path(".flipad/bench/demo"), 1, 1000, train, "cpu")
    start = time.perf_counter()
    encoder = train_encoder(generator, DEMO_LATENT, (1, 32, 32), RANGE, args.encoder_steps, seed=0)
    print(f"encoder: {args.encoder_steps} batches in {time.perf_counter() - start:.0f} s")
    differentiate = search_jacobian(generator, DEMO_LATENT)
    keys = KeySet(SECRET, args.recipients, 64)
    schemes = {"distribution-preserving (flipad.keys)": KeyedSampler(generator, DEMO_LATENT, keys, RANGE),
               "direction key (Nie et al.)": DirectionKey(generator, DEMO_LATENT, keys, bits=32)}
    rng = np.random.default_rng(0)
    who = [keys.recipients[i] for i in rng.integers(0, args.recipients, args.items)]
    negatives = {"unkeyed": generate_samples(generator, DEMO_LATENT, args.unkeyed, 99, RANGE),
                 "look-alike": generate_samples(other, DEMO_LATENT, args.foreign, 98, RANGE),
                 "real": load_fashion_mnist("test", 32, limit=args.foreign)}

    def latents(images: np.ndarray, threads: int = 2) -> tuple[torch.Tensor, float]:
        torch.set_num_threads(threads)
        began = time.perf_counter()
        z = invert(generator, encoder, images, RANGE, differentiate=differentiate)
        seconds = (time.perf_counter() - began) / len(images)
        torch.set_num_threads(2)
        return z, seconds

    def match(scheme, z: torch.Tensor) -> list:
        return scheme.keys.match(z) if isinstance(scheme, KeyedSampler) else scheme.match(z)

    print("| scheme | items | bit accuracy | recipient accuracy | wrong recipient | s/item (1 thread) |")
    print("|---|---|---|---|---|---|")
    for label, scheme in schemes.items():
        images = np.concatenate([scheme.sample(r, 1, seed=i) for i, r in enumerate(who)])
        for variant, change in VARIANTS.items():
            z, seconds = latents(change(images), threads=1 if variant == "pristine" else 2)
            matches = match(scheme, z)
            right = np.mean([m.recipient == r for m, r in zip(matches, who)])
            wrong = sum(m.recipient not in (None, r) for m, r in zip(matches, who))
            bits = np.mean([m.bit_accuracy for m in matches])
            timing = f"{seconds:.4f}" if variant == "pristine" else ""
            print(f"| {label} | {variant} | {bits:.4f} | {right:.4f} | {wrong} | {timing} |")
    print("\n| scheme | false matches: unkeyed | look-alike | real |\n|---|---|---|---|")
    inverted = {name: latents(x)[0] for name, x in negatives.items()}
    for label, scheme in schemes.items():
        counts = [f"{sum(m.recipient is not None for m in match(scheme, z))} of {len(z)}" for z in inverted.values()]
        print(f"| {label} | " + " | ".join(counts) + " |")
    print("\n| scheme | classifier two-sample accuracy | Frechet distance (PCA-64) | unkeyed vs unkeyed |\n|---|---|---|---|")
    plain = generate_samples(generator, DEMO_LATENT, 2000, 11, RANGE).reshape(2000, -1) / 255.0
    baseline = generate_samples(generator, DEMO_LATENT, 2000, 12, RANGE).reshape(2000, -1) / 255.0
    pca = PCA(64, random_state=0).fit(plain)
    for label, scheme in schemes.items():
        keyed = np.concatenate([scheme.sample(keys.recipients[i % args.recipients], 1, seed=10_000 + i)
                                for i in range(2000)]).reshape(2000, -1) / 255.0
        accuracy = cross_val_score(LogisticRegression(max_iter=3000, C=0.01), np.r_[keyed, plain],
                                   np.r_[np.ones(2000), np.zeros(2000)], cv=5).mean()
        print(f"| {label} | {accuracy:.3f} | {frechet(pca.transform(keyed), pca.transform(plain)):.3f} | "
              f"{frechet(pca.transform(baseline), pca.transform(plain)):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
