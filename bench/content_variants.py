"""Each re-encoding content meets, through the served scoring path: attributed, undecided, errors.

The demo's shipped generator (32x32 grey DCGAN, latent 64) gets the default detector with the
product's settings (the reconstruction family, encoder-lm search, thresholds calibrated on
pristine samples and on JPEG q95/q90/q80/q70 copies), fitted in-process at the given sizes. ``--items`` fresh own items and as many real
Fashion-MNIST test images are then encoded each way below and scored as bytes by
``flipad.scoring.score_items`` (what the flows and the served model run): decoding (WebP, a
grey image stored as RGB, the near-grey conversion), the estimated JPEG quality and the
``undecided`` verdict included. Prints a markdown table: per re-encoding, the share of own items
attributed, undecided and errored, and the share of real images attributed.
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flipad import DetectorSettings, ReconstructionLossDetector, family_settings
from flipad.io.data import encode_item
from flipad.scoring import score_items
from flows.datasets import load_fashion_mnist
from flows.demo import DEMO_LATENT, demo_generator

from .report import Benchmark, markdown_table


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


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench content_variants", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--validation", type=int, default=300)
    parser.add_argument("--perturbed", type=int, default=150)
    parser.add_argument("--encoder-steps", type=int, default=400)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    start = time.perf_counter()
    train = load_fashion_mnist("train", 32, limit=20_000)
    generator, _ = demo_generator(Path(".flipad/bench/demo"), 0, 1000, train, "cpu")
    settings = DetectorSettings(n_validation=args.validation, device="cpu", progress=False, families=family_settings(
        {"reconstruction": {"encoder_steps": args.encoder_steps, "n_perturbed": args.perturbed}}))
    detector = ReconstructionLossDetector.from_settings(generator, DEMO_LATENT, settings).fit()
    print(f"fitted in {time.perf_counter() - start:.0f} s; calibrated down to JPEG q{detector.calibrated_jpeg_quality():.0f}")
    own = detector.generate(args.items, seed=4321)
    real = load_fashion_mnist("test", 32, limit=2000 + args.items)[2000:]
    rows = []
    for name, encode in VARIANTS.items():
        mine = _shares(detector, [encode(x) for x in own])
        other = _shares(detector, [encode(x) for x in real])
        rows.append({"re-encoding": name, "own attributed": mine["attributed"], "own undecided": mine["undecided"],
                     "own errors": mine["error"], "real attributed": other["attributed"]})
        print(" | ".join(f"{v:.3f}" if isinstance(v, float) else v for v in rows[-1].values()), flush=True)
    return {"items": args.items, "validation": args.validation, "perturbed": args.perturbed,
            "encoder_steps": args.encoder_steps, "calibrated_quality": detector.calibrated_jpeg_quality(), "rows": rows}


def render(figures: dict) -> str:
    return (f"{figures['items']} own items and as many real images per re-encoding; thresholds from "
            f"{figures['validation']} validation samples ({figures['perturbed']} per re-save), encoder "
            f"{figures['encoder_steps']} batches; calibrated down to JPEG q{figures['calibrated_quality']:.0f}.\n\n"
            + markdown_table(figures["rows"]))


def headline(figures: dict) -> list[str]:
    decided = [r for r in figures["rows"] if r["own undecided"] == 0 and r["own errors"] == 0]
    undecided = [r for r in figures["rows"] if r["own undecided"] > 0]
    if not decided:
        return []
    worst = min(decided, key=lambda r: r["own attributed"])
    sure = [r for r in decided if r["own attributed"] >= 0.97]
    return [f"Re-encodings of own items (demo generator): attributed >= {min(r['own attributed'] for r in sure):.3f} "
            f"in {len(sure)} of {len(figures['rows'])} ({', '.join(r['re-encoding'] for r in sure)}); undecided in "
            + ", ".join(f"{r['re-encoding']} {r['own undecided']:.3f}" for r in undecided)
            + f"; worst decided: {worst['re-encoding']} {worst['own attributed']:.3f}; real attributed <= "
            f"{max(r['real attributed'] for r in figures['rows']):.3f}"] if sure else []


BENCHMARK = Benchmark("content_variants", __doc__, run, render, headline,
                      quick=("--items", "10", "--validation", "60", "--perturbed", "30", "--encoder-steps", "30"))
