"""Malformed, oversized and odd items for 32x32 grayscale generators: the stream-fault bench
(``bench/stream_faults.py``) and ``tests/test_stream_faults.py`` use the same ones."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image, PngImagePlugin

from flipad.io.data import encode_item

__all__ = ["poison_items", "odd_valid_items", "saved"]


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def saved(image: Image.Image, fmt: str, **options) -> bytes:
    """``image`` encoded as ``fmt`` by Pillow."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def poison_items(seed: int = 0) -> dict[str, bytes]:
    """Malformed, oversized and odd items that must each become one error row (none attributed):
    decompression bombs, header claims past any limit, non-finite values, conversions the policy
    refuses, truncated and non-image files. ``seed`` varies the random bytes."""
    rng = np.random.default_rng(seed)
    text = PngImagePlugin.PngInfo()
    text.add_text("comment", "x" * 2**25, zip=True)
    nan = np.zeros((1, 32, 32), np.float32)
    nan[0, rng.integers(32), rng.integers(32)] = np.nan
    huge = _npy(np.zeros(4, np.float32)).replace(b"(4,)", f"({2**38},)".encode())
    rgb = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    return {
        "bomb.png": _png_header(30000, 30000),
        "bomb.gif": b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00;",
        "ztxt.png": saved(Image.fromarray(np.zeros((32, 32), np.uint8)), "PNG", pnginfo=text),
        "huge.npy": huge,
        "nan.npy": _npy(nan),
        "all-nan.npy": _npy(np.full((1, 32, 32), np.nan, np.float32)),
        "inf.npy": _npy(np.full((1, 32, 32), np.inf, np.float32)),
        "1e30.npy": _npy(np.full((1, 32, 32), 1e30, np.float32)),
        "colour.png": saved(rgb, "PNG"),
        "16bit.png": saved(Image.fromarray(np.full((32, 32), 40000, np.uint16)), "PNG"),
        "float.tiff": saved(Image.fromarray(np.zeros((32, 32), np.float32)), "TIFF"),
        "truncated.png": encode_item(rng.integers(0, 255, (1, 32, 32), dtype=np.uint8))[:40],
        "wrong-size.png": encode_item(rng.integers(0, 255, (1, 28, 28), dtype=np.uint8)),
        "empty.png": b"",
        "notes.txt": b"not an image",
    }


def odd_valid_items(images: np.ndarray) -> dict[str, bytes]:
    """Valid 8-bit grayscale images (``images``: uint8 (N, 1, 32, 32), N >= 6) under odd names and
    in odd but lossless formats: each must be scored."""
    grey = [image[0] for image in images]
    return {
        os.fsdecode(b"odd-\xff\xfe.png"): encode_item(images[0]),  # a name that is not UTF-8
        "UPPER.PNG": encode_item(images[1]),
        "grey-as-rgb.png": saved(Image.fromarray(np.repeat(grey[2][..., None], 3, 2)), "PNG"),
        "palette.gif": saved(Image.fromarray(grey[3]), "GIF"),
        "with space & ünïcode.png": encode_item(images[4]),
        "-leading-dash.bmp": saved(Image.fromarray(grey[5]), "BMP"),
        f"{'long' * 50}.png": encode_item(images[0]),
        "eight-bit.tiff": saved(Image.fromarray(grey[1]), "TIFF"),
        "uint8.npy": _npy(images[2]),
    }
