"""What an in-the-wild run shares: the re-encodings content meets, a folder of them per source,
and issue 32's verdict bar read from ``flipad attribute``'s rows."""

from __future__ import annotations

import io
import shlex
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from flipad.io.data import encode_item
from flipad.io.perturb import perturb
from flows.demo import encode_jpeg

VARIANTS = ("png", "jpeg-q90", "jpeg-q80", "png-of-jpeg-q80", "webp-q80")  # own items must be attributed in each
Q60 = "jpeg-q60"  # below the calibrated qualities: attributed or undecided, not "not generated"
TEST_SEED = 271828  # none of onboarding's seeds: new samples of a generator
BAR = {"own": 0.97, "other": 0.02, "real": 0.01, "own q60 not generated": 0.03}


def _webp(image: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buffer, "WEBP", quality=quality)
    return buffer.getvalue()


def write_variants(stream: Path, source: str, images: np.ndarray) -> None:
    """``images`` (uint8 (N, C, H, W)) under ``stream``, one folder ``SOURCE--VARIANT`` per variant
    and JPEG q60 (JPEGs with PIL's default chroma subsampling, 4:2:0 for colour)."""
    encoders = {"png": (".png", encode_item), "jpeg-q90": (".jpg", lambda x: encode_jpeg(x, 90)),
                "jpeg-q80": (".jpg", lambda x: encode_jpeg(x, 80)), Q60: (".jpg", lambda x: encode_jpeg(x, 60)),
                "webp-q80": (".webp", lambda x: _webp(x, 80))}
    for variant, (suffix, encode) in encoders.items():
        folder = stream / f"{source}--{variant}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            (folder / f"{i:05d}{suffix}").write_bytes(encode(image))
    folder = stream / f"{source}--png-of-jpeg-q80"
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(perturb(images, "jpeg q80")):
        (folder / f"{i:05d}.png").write_bytes(encode_item(image))


def read_rows(results: Path) -> pd.DataFrame:
    """``flipad attribute``'s CSV, ``is_generated`` as True, False or None (undecided)."""
    rows = pd.read_csv(results, keep_default_na=False)
    rows["is_generated"] = rows["is_generated"].map({"True": True, "False": False, "": None})
    return rows


def run_command(command: list[str], cwd: Path, env: dict) -> float:
    """Run one CLI command, its output going to the bench's; its seconds. Fails the bench when it fails."""
    print("$ " + shlex.join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, check=True)
    return time.perf_counter() - start


def worst_figures(attributed: pd.Series, rows: pd.DataFrame, own: str, others: list[str],
                  real: list[str]) -> dict[str, float]:
    """The bar's figures for one detector: ``attributed``, its share attributed per folder
    (``flows.demo.source_table``), and ``rows``, its rows of ``flipad attribute``. Its own source's
    worst variant, the share of own JPEG q60 items called not generated, the worst variant of any
    ``others`` source and the worst of the ``real`` folders."""
    q60 = rows[rows["uri"].str.contains(f"/{own}--{Q60}/", regex=False)]
    return {"own": min(attributed[f"{own}--{v}"] for v in VARIANTS),
            "own q60 not generated": float((q60["is_generated"] == False).mean()),  # noqa: E712 (None: undecided)
            "other": max((attributed[f"{o}--{v}"] for o in others for v in VARIANTS), default=0.0),
            "real": max(attributed[r] for r in real)}


def bar_met(worst: dict[str, float]) -> bool:
    """Whether the figures of :func:`worst_figures` meet issue 32's verdict bar."""
    return (worst["own"] >= BAR["own"] and worst["other"] <= BAR["other"] and worst["real"] <= BAR["real"]
            and worst["own q60 not generated"] <= BAR["own q60 not generated"])
