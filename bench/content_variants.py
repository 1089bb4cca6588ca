"""Each re-encoding content meets, through the served scoring path: attributed, undecided, errors.

    python bench/content_variants.py [--items 200] [--validation 300] [--perturbed 150]
                                     [--encoder-steps 400]

The demo's shipped generator (32x32 grey DCGAN, latent 64) gets the default detector (the
reconstruction family, thresholds calibrated on pristine samples and on JPEG q95/q90/q80/q70
copies), fitted in-process at the given sizes. ``--items`` fresh own items and as many real
Fashion-MNIST test images are then encoded each way below and scored as bytes by
``flipad.io.scoring.score_items`` (what the flows and the served model run): decoding (WebP, a
grey image stored as RGB, the near-grey conversion), the estimated JPEG quality and the
``undecided`` verdict included. Prints a markdown table: per re-encoding, the share of own items
attributed, undecided and errored, and the share of real images attributed.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flipad import ReconstructionConfig, ReconstructionLossDetector  # noqa: E402
from flipad.detectors.base import ROBUST_PERTURBATIONS  # noqa: E402
from flipad.io.data import encode_item  # noqa: E402
from flipad.io.scoring import score_items  # noqa: E402
from flows.datasets import load_fashion_mnist  # noqa: E402
from flows.demo import DEMO_LATENT, demo_generator  # noqa: E402


def _save(image: np.ndarray, fmt: str, rgb: bool = False, **options) -> bytes:
    buffer = io.BytesIO()
    pil = Image.fromarray(image[0])
    (pil.convert("RGB") if rgb else pil).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_of(data: bytes) -> bytes:
    return encode_item(np.asarray(Image.open(io.BytesIO(data)).convert("L"))[None])


VARIANTS: dict[str, Callable[[np.ndarray], bytes]] = {
    "PNG": encode_item,
    "JPEG q90": lambda x: _save(x, "JPEG", quality=90),
    "JPEG q80": lambda x: _save(x, "JPEG", quality=80),
    "JPEG q70": lambda x: _save(x, "JPEG", quality=70),
    "JPEG q60": lambda x: _save(x, "JPEG", quality=60),
    "JPEG q50": lambda x: _save(x, "JPEG", quality=50),
    "RGB JPEG 4:2:0 q80": lambda x: _save(x, "JPEG", rgb=True, quality=80, subsampling=2),
    "RGB JPEG 4:4:4 q80": lambda x: _save(x, "JPEG", rgb=True, quality=80, subsampling=0),
    "PNG of JPEG q80": lambda x: _png_of(_save(x, "JPEG", quality=80)),
    "PNG of JPEG q60": lambda x: _png_of(_save(x, "JPEG", quality=60)),
    "WebP q90": lambda x: _save(x, "WEBP", quality=90),
    "WebP q80": lambda x: _save(x, "WEBP", quality=80),
    "WebP q60": lambda x: _save(x, "WEBP", quality=60),
    "PNG of WebP q80": lambda x: _png_of(_save(x, "WEBP", quality=80)),
}


def _shares(detector, items: list[bytes]) -> dict[str, float]:
    verdicts = [r.verdict for r in score_items(detector, items)]
    return {v: verdicts.count(v) / len(verdicts) for v in ("attributed", "undecided", "error")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--validation", type=int, default=300)
    parser.add_argument("--perturbed", type=int, default=150)
    parser.add_argument("--encoder-steps", type=int, default=400)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    start = time.perf_counter()
    train = load_fashion_mnist("train", 32, limit=20_000)
    generator, _ = demo_generator(Path(".flipad/bench/demo"), 0, 1000, train, "cpu")
    detector = ReconstructionLossDetector(
        generator, DEMO_LATENT, n_validation=args.validation, config=ReconstructionConfig(encoder_steps=args.encoder_steps),
        device="cpu", progress=False, perturbations=ROBUST_PERTURBATIONS, n_perturbed=args.perturbed).fit()
    print(f"fitted in {time.perf_counter() - start:.0f} s; calibrated down to JPEG q{detector.calibrated_jpeg_quality():.0f}")
    own = detector.generate(args.items, seed=4321)
    real = load_fashion_mnist("test", 32, limit=2000 + args.items)[2000:]
    print("| re-encoding | own attributed | own undecided | own errors | real attributed |\n|---|---|---|---|---|")
    for name, encode in VARIANTS.items():
        mine = _shares(detector, [encode(x) for x in own])
        other = _shares(detector, [encode(x) for x in real])
        print(f"| {name} | {mine['attributed']:.3f} | {mine['undecided']:.3f} | {mine['error']:.3f} | "
              f"{other['attributed']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
