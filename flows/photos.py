"""RGB photos for the tests, the benchmarks and onboarding examples, fetched at set-up and never
committed: the nature photos of Debian's ``mate-backgrounds`` (GPL-2+) where apt exists, else the
sample photos inside scikit-image's wheel (PyPI). Patches are cut from them at any size.

Like :mod:`flows.datasets`, this is where data is found; the library takes arrays from its caller.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from flipad.io.data import DataError
from flipad.io.files import fill_once

__all__ = ["ensure_photos", "photo_patches", "photos_cache"]

logger = logging.getLogger(__name__)

DEBIAN_PACKAGE = "mate-backgrounds"
# scikit-image's colour photos (its wheel ships them; the rest of its data is grey or synthetic)
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png")


def photos_cache() -> Path:
    """The folder fetched photos live in (``$FLIPAD_PHOTOS`` when set)."""
    if os.environ.get("FLIPAD_PHOTOS"):
        return Path(os.environ["FLIPAD_PHOTOS"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "flipad" / "photos"


def _found(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def _from_debian(cache: Path) -> None:
    """``apt-get download`` mate-backgrounds (no root needed) and keep its nature photos."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=tmp, check=True, capture_output=True, timeout=600)
        (deb,) = Path(tmp).glob("*.deb")
        subprocess.run(["dpkg", "-x", str(deb), str(Path(tmp) / "root")], check=True, capture_output=True, timeout=600)
        nature = [p for p in (Path(tmp) / "root").rglob("*.jpg") if p.parent.name == "nature"]
        if not nature:
            raise DataError(f"{deb.name} holds no nature photos")
        for path in nature:
            shutil.copyfile(path, cache / path.name)


def _from_pypi(cache: Path) -> None:
    """``pip download`` scikit-image's wheel (no install) and keep its colour sample photos."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "scikit-image", "-d", tmp], check=True, capture_output=True, timeout=600)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            for name in SKIMAGE_PHOTOS:
                (cache / name).write_bytes(archive.read(f"skimage/data/{name}"))


def ensure_photos() -> list[Path]:
    """The photo files: found in :func:`photos_cache`, else fetched there (Debian package where apt
    exists, else scikit-image's wheel). Raises ``DataError`` listing what was tried."""
    cache = photos_cache()
    if _found(cache):
        return _found(cache)
    tried = []
    fetchers = [("apt-get download " + DEBIAN_PACKAGE, _from_debian)] if shutil.which("apt-get") and shutil.which("dpkg") else []
    fetchers.append(("pip download scikit-image", _from_pypi))
    for what, fetch in fetchers:
        logger.warning("no photos in %s; trying %s", cache, what)
        try:
            if fill_once(cache, lambda folder: bool(_found(folder)), fetch):  # one fetch at a time, never a partial set
                return _found(cache)
        except (OSError, subprocess.SubprocessError, ValueError, KeyError, DataError) as exc:
            tried.append(f"{what}: {exc}")
    raise DataError(f"no RGB photos in {cache} and none could be fetched ({'; '.join(tried)}); "
                    "set FLIPAD_PHOTOS to a folder of JPEG/PNG photos")


def photo_patches(size: int, n: int, seed: int = 0, split: str = "train", scale: int = 256) -> np.ndarray:
    """``n`` RGB patches (uint8 (n, 3, size, size)) cut at random places from the photos, each photo
    first resized so its shorter side is ``scale`` pixels (photos are large; a patch should hold a
    scene's detail, not one leaf). ``split`` "train" takes the even photos, "test" the odd ones, so
    the two never share a photo."""
    if split not in ("train", "test"):
        raise ValueError(f"split {split!r}: use train or test")
    paths = ensure_photos()[split == "test"::2]
    rng = np.random.default_rng(seed)
    photos = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            factor = max(scale, size) / min(image.size)
            image = image.resize((max(size, round(image.width * factor)), max(size, round(image.height * factor))),
                                 Image.Resampling.LANCZOS)
            photos.append(np.asarray(image))
    out = np.empty((n, 3, size, size), np.uint8)
    for k in range(n):
        photo = photos[rng.integers(len(photos))]
        top = rng.integers(photo.shape[0] - size + 1)
        left = rng.integers(photo.shape[1] - size + 1)
        patch = photo[top:top + size, left:left + size]
        out[k] = (patch[:, ::-1] if rng.random() < 0.5 else patch).transpose(2, 0, 1)
    return out
