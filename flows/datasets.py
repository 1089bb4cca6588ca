"""Getting Fashion-MNIST onto a fresh machine (the demo, the tests, the benchmarks): local copies
first, then fetch into a cache. The library (``flipad``) takes data locations from its caller;
this module is where they are found."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from flipad.io.data import DataError, read_fashion_mnist
from flipad.io.files import fill_once

__all__ = ["ensure_fashion_mnist", "fashion_mnist_cache", "fashion_mnist_candidates", "find_fashion_mnist",
           "load_fashion_mnist"]

logger = logging.getLogger(__name__)

DEBIAN_PACKAGE = "dataset-fashion-mnist"
PUBLIC_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")  # where the Debian package installs it


def fashion_mnist_candidates(root: str | os.PathLike | None = None) -> list[Path]:
    """Where Fashion-MNIST is looked for, in order: ``root``, ``$FLIPAD_DATA`` (or
    ``$FLIPAD_FASHION_MNIST``), the Debian package's folder, and the fetch cache
    ``~/.cache/flipad/fashion-mnist``."""
    candidates = [Path(p) for p in (root, os.environ.get("FLIPAD_DATA"), os.environ.get("FLIPAD_FASHION_MNIST")) if p]
    return [*candidates, DEBIAN_FOLDER, fashion_mnist_cache()]


def fashion_mnist_cache() -> Path:
    """The folder a fetched copy of Fashion-MNIST lives in."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "flipad" / "fashion-mnist"


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the Fashion-MNIST IDX files (see :func:`fashion_mnist_candidates`)."""
    candidates = fashion_mnist_candidates(root)
    for folder in candidates:
        if (folder / "train-images-idx3-ubyte.gz").is_file():
            return folder
    raise DataError(
        f"Fashion-MNIST not found in {', '.join(map(str, candidates))}; set FLIPAD_DATA to the folder with "
        "train-images-idx3-ubyte.gz or install the Debian package dataset-fashion-mnist"
    )


def _from_debian(cache: Path) -> None:
    """``apt-get download`` the Debian package (no root needed) and unpack its files with ``dpkg -x``."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=tmp, check=True, capture_output=True, timeout=600)
        (deb,) = Path(tmp).glob("*.deb")
        subprocess.run(["dpkg", "-x", str(deb), str(Path(tmp) / "root")], check=True, capture_output=True, timeout=600)
        found = next((Path(tmp) / "root").rglob("train-images-idx3-ubyte.gz")).parent
        for name in FILES:
            shutil.copyfile(found / name, cache / name)


def _from_public(cache: Path) -> None:
    for name in FILES:
        with urllib.request.urlopen(PUBLIC_URL + name, timeout=60) as response:
            (cache / name).write_bytes(response.read())


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FILES)


def ensure_fashion_mnist() -> Path:
    """The Fashion-MNIST folder: found locally, else fetched (Debian package where apt exists, else the
    public download) into ``~/.cache/flipad/fashion-mnist``. Raises ``DataError`` listing what was tried."""
    try:
        return find_fashion_mnist()
    except DataError:
        pass
    tried = [f"looked in {', '.join(map(str, fashion_mnist_candidates()))}"]
    cache = fashion_mnist_cache()
    fetchers = ([("apt-get download " + DEBIAN_PACKAGE, _from_debian)] if shutil.which("apt-get") and shutil.which("dpkg") else [])
    fetchers.append((f"download from {PUBLIC_URL}", _from_public))
    for what, fetch in fetchers:
        logger.warning("Fashion-MNIST not found locally; trying %s", what)
        try:
            if fill_once(cache, _complete, fetch):  # one fetch at a time into the cache, never a partial set
                return cache
        except (OSError, subprocess.SubprocessError, StopIteration, ValueError, DataError) as exc:
            tried.append(f"{what}: {exc}")
    raise DataError("Fashion-MNIST is not available; " + "; ".join(tried) + ". Set FLIPAD_DATA to a folder with its IDX files")


def load_fashion_mnist(split: str = "train", size: int = 32, limit: int | None = None) -> np.ndarray:
    """Fashion-MNIST images (uint8 (N, 1, size, size)) from wherever :func:`ensure_fashion_mnist` finds
    or fetches them."""
    return read_fashion_mnist(ensure_fashion_mnist(), split, size, limit)
