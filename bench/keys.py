"""Keyed sampling: distribution-preserving keys (flipad.keys) against Nie et al.'s direction keys.

On the demo's shipped generator (32x32 grey DCGAN, latent 64), with its latent search's encoder
trained for ``--encoder-steps`` batches (the onboarding default is 1,000): ``--items`` keyed
samples, each for a recipient drawn among ``--recipients``, by each scheme, decoded pristine and
after JPEG q90 / q80 / q60 and WebP q80; and ``--unkeyed`` unkeyed samples and ``--foreign``
each of the look-alike (the other-seed demo generator) and real Fashion-MNIST images, inverted
once and matched against every key of both schemes. Prints per scheme and variant the bit accuracy, the recipient accuracy, wrong recipients,
false matches, and the seconds per item to decode on one thread; then the quality cost: the
5-fold accuracy of a logistic-regression classifier telling ``--quality-items`` (2,000) keyed
images from as many unkeyed ones (0.5: no difference) and the Frechet distance between them in a 64-component PCA
of the pixels (beside the distance between two unkeyed sets, the noise floor).
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from flipad.generators.sampling import generate_samples
from flipad.inversion.amortised import train_encoder
from flipad.inversion.tangents import search_jacobian
from flipad.io.data import decode_image
from flipad.keys import DirectionKey, KeySet, KeyedSampler, invert
from flows.datasets import load_fashion_mnist
from flows.demo import DEMO_LATENT, demo_generator

from .report import Benchmark, markdown_table

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


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench keys", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipients", type=int, default=1000)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--unkeyed", type=int, default=8000)
    parser.add_argument("--foreign", type=int, default=1000)
    parser.add_argument("--encoder-steps", type=int, default=1000)
    parser.add_argument("--quality-items", type=int, default=2000)
    args = parser.parse_args(argv)
    n = args.quality_items
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

    decoding, false_matches, quality = [], [], []
    for label, scheme in schemes.items():
        images = np.concatenate([scheme.sample(r, 1, seed=i) for i, r in enumerate(who)])
        for variant, change in VARIANTS.items():
            z, seconds = latents(change(images), threads=1 if variant == "pristine" else 2)
            matches = match(scheme, z)
            right = np.mean([m.recipient == r for m, r in zip(matches, who)])
            wrong = sum(m.recipient not in (None, r) for m, r in zip(matches, who))
            bits = np.mean([m.bit_accuracy for m in matches])
            decoding.append({"scheme": label, "items": variant, "bit accuracy": float(bits),
                             "recipient accuracy": float(right), "wrong recipient": int(wrong),
                             "s per item (1 thread)": seconds if variant == "pristine" else None})
            print(decoding[-1], flush=True)
    inverted = {name: latents(x)[0] for name, x in negatives.items()}
    for label, scheme in schemes.items():
        false_matches.append({"scheme": label, **{f"false matches: {name}": f"{sum(m.recipient is not None for m in match(scheme, z))} of {len(z)}"
                                                  for name, z in inverted.items()}})
        print(false_matches[-1], flush=True)
    plain = generate_samples(generator, DEMO_LATENT, n, 11, RANGE).reshape(n, -1) / 255.0
    baseline = generate_samples(generator, DEMO_LATENT, n, 12, RANGE).reshape(n, -1) / 255.0
    pca = PCA(min(64, n // 2), random_state=0).fit(plain)
    for label, scheme in schemes.items():
        keyed = np.concatenate([scheme.sample(keys.recipients[i % args.recipients], 1, seed=10_000 + i)
                                for i in range(n)]).reshape(n, -1) / 255.0
        accuracy = cross_val_score(LogisticRegression(max_iter=3000, C=0.01), np.r_[keyed, plain],
                                   np.r_[np.ones(n), np.zeros(n)], cv=5).mean()
        quality.append({"scheme": label, "two-sample classifier accuracy": float(accuracy),
                        "Frechet distance (PCA-64)": frechet(pca.transform(keyed), pca.transform(plain)),
                        "unkeyed vs unkeyed": frechet(pca.transform(baseline), pca.transform(plain))})
        print(quality[-1], flush=True)
    return {"recipients": args.recipients, "items": args.items, "encoder_steps": args.encoder_steps,
            "quality_items": n, "decoding": decoding, "false_matches": false_matches, "quality": quality}


def render(figures: dict) -> str:
    return "\n\n".join([
        f"{figures['recipients']} recipients, {figures['items']} keyed items per scheme and variant, encoder "
        f"{figures['encoder_steps']} batches; quality from {figures['quality_items']} keyed and as many unkeyed images.",
        markdown_table(figures["decoding"], formats={"bit accuracy": ".4f", "recipient accuracy": ".3f",
                                                     "s per item (1 thread)": ".4f"}),
        markdown_table(figures["false_matches"]), markdown_table(figures["quality"])])


def headline(figures: dict) -> list[str]:
    ours = {r["items"]: r for r in figures["decoding"] if r["scheme"].startswith("distribution")}
    wrong = sum(r["wrong recipient"] for r in figures["decoding"])
    return [f"Keyed sampling, {figures['recipients']} recipients: recipient read {ours['pristine']['recipient accuracy']:.3f} "
            f"pristine, {ours['jpeg q80']['recipient accuracy']:.3f} after JPEG q80, {wrong} wrong; two-sample "
            f"classifier accuracy {figures['quality'][0]['two-sample classifier accuracy']:.3f} (0.5: no difference)"]


BENCHMARK = Benchmark("keys", __doc__, run, render, headline,
                      quick=("--recipients", "20", "--items", "10", "--unkeyed", "40", "--foreign", "20",
                             "--encoder-steps", "30", "--quality-items", "100"))
