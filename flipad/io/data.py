"""Loading content: image folders, NumPy arrays, CSV tables and IDX files (Fashion-MNIST).

Images cross the API as uint8 arrays of shape (N, C, H, W); tabular rows as
float32 arrays of shape (N, D). Generated samples are quantised to 8 bits the
way a published PNG is, since that is what arrives in the wild.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from scipy.fft import dctn, idctn

__all__ = [
    "ItemInfo",
    "is_near_grey",
    "item_info",
    "webp_is_lossless",
    "estimate_jpeg_quality",
    "pixel_stats",
    "encode_item",
    "load_dataset",
    "decode_item",
    "IMAGE_SUFFIXES",
    "DataError",
    "decode_image",
    "list_image_files",
    "load_images",
    "load_table",
    "load_array",
    "load_idx",
    "read_fashion_mnist",
    "resize_images",
    "quantize",
    "to_output_range",
    "check_sample_shape",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class DataError(ValueError):
    """Input data that cannot be used, with a message that says what to do."""


MAX_PIXELS = 4096 * 4096  # per decoded item; larger headers are refused before any pixel is decoded


def decode_image(data: bytes, channels: int | None = None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode image bytes (PNG, JPEG, WebP or any 8-bit raster Pillow reads) into a uint8 (C, H, W) array.

    ``channels`` (1 or 3) is what the generator makes. The conversion policy, so nothing is
    converted silently: 8-bit grey, palette and colour images are used as they are when they
    already have that many channels, or when the conversion loses nothing (a grey image stored as
    RGB or palette, an opaque alpha channel, grey to RGB); a near-grey colour image (what a
    grey image becomes after a codec that stores colour, such as lossy WebP: see
    :func:`is_near_grey`) becomes its luma for a grey generator; a colour image for a grey generator, a
    translucent alpha channel, 16-bit or floating-point pixels raise ``DataError`` saying so. Every
    failure of the decoder (truncated or malicious files, decompression bombs, oversized text or
    ICC chunks) is a ``DataError`` too.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > max_pixels:
                    raise DataError(f"image of {img.width}x{img.height} pixels exceeds the limit of {max_pixels}")
                img.load()
                arr = _to_channels(img, channels)
    except DataError:
        raise
    except UnidentifiedImageError as exc:
        raise DataError("not a decodable image (PNG/JPEG/WebP)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"refused as a decompression bomb ({exc})") from exc
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, struct.error, EOFError...
        raise DataError(f"not a decodable image ({type(exc).__name__}: {str(exc)[:120]})") from exc
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy()


def _to_channels(img: Image.Image, channels: int | None) -> np.ndarray:
    """The pixels of ``img`` as uint8 (H, W) or (H, W, 3), by :func:`decode_image`'s policy."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F") or img.mode.startswith("I;"):
        raise DataError(f"{'floating-point' if img.mode == 'F' else '16/32-bit'} pixels (mode {img.mode}); "
                        "the generator's samples are 8-bit: save the item with 8 bits per channel")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"))
        if (rgba[..., 3] != 255).any():
            raise DataError("the image is translucent (an alpha channel below 255); flatten it onto a background first")
    rgb = img.mode not in ("L", "1") and not (img.mode in ("P", "PA", "LA") and _is_gray(img))
    if rgb:
        arr = np.asarray(img.convert("RGB"))
        grey = bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all())
        if channels == 1:
            if grey:
                return arr[..., 0]
            if is_near_grey(arr):
                return np.asarray(Image.fromarray(arr).convert("L"))  # ITU-R 601 luma
            spread = arr.max(-1).astype(np.int16) - arr.min(-1)
            raise DataError(f"colour image (3 channels, mean channel spread {spread.mean():.1f} of 255) for a "
                            "generator of 1-channel images; convert it to grey only if that is what you mean to test")
        return arr if channels == 3 or not grey else arr[..., 0]
    arr = np.asarray(img.convert("L"))
    return np.repeat(arr[..., None], 3, axis=2) if channels == 3 else arr


# A grey image through a codec that stores colour (lossy WebP's YUV 4:2:0, an RGB JPEG) comes
# back with R, G and B at most 1 apart on 0.5% of its pixels (Fashion-MNIST through WebP q50-q95
# measured); a colour photograph differs by tens. Below these it is grey, read as its luma.
NEAR_GREY_MEAN_SPREAD = 2.0
NEAR_GREY_MAX_SPREAD = 16


def is_near_grey(rgb: np.ndarray) -> bool:
    """Whether uint8 (H, W, 3) pixels are grey up to codec noise: the spread of R, G and B is at most
    :data:`NEAR_GREY_MAX_SPREAD` everywhere and :data:`NEAR_GREY_MEAN_SPREAD` on average."""
    spread = rgb.max(-1).astype(np.int16) - rgb.min(-1)
    return bool(spread.max() <= NEAR_GREY_MAX_SPREAD and spread.mean() <= NEAR_GREY_MEAN_SPREAD)


@dataclass(frozen=True)
class ItemInfo:
    """What an item is, read from its header: ``format`` (``png``, ``jpeg``, ``webp``, ``npy``, ...;
    empty when unreadable), ``height``/``width`` in pixels (0 when unknown), for a JPEG its
    estimated ``jpeg_quality`` (NaN otherwise), and whether the container stores its pixels
    exactly (``lossless``: PNG, BMP, GIF, PPM, uncompressed or losslessly compressed TIFF,
    lossless WebP, ``.npy``). A lossless container may still hold pixels that went through a
    lossy codec before (a PNG of a JPEG): :func:`jpeg_history_quality` looks for that."""

    format: str = ""
    height: int = 0
    width: int = 0
    jpeg_quality: float = float("nan")
    lossless: bool = False


LOSSLESS_FORMATS = frozenset({"png", "bmp", "gif", "ppm"})
LOSSY_TIFF_COMPRESSIONS = frozenset({"jpeg", "tiff_jpeg", "webp"})


def item_info(data: bytes) -> ItemInfo:
    """The :class:`ItemInfo` of encoded item bytes; never raises (an unreadable item has an empty format)."""
    if data[:6] == NPY_MAGIC:
        try:
            shape = _npy_header(io.BytesIO(data))[0]
        except (ValueError, SyntaxError, EOFError):
            shape = ()
        height, width = (int(shape[-2]), int(shape[-1])) if len(shape) >= 2 else (0, 0)
        return ItemInfo("npy", height, width, lossless=True)
    try:
        with Image.open(io.BytesIO(data)) as img:
            kind = (img.format or "").lower()
            quality = estimate_jpeg_quality(img.quantization) if kind == "jpeg" and getattr(img, "quantization", None) \
                else float("nan")
            if kind == "tiff":
                lossless = str(img.info.get("compression", "raw")).lower() not in LOSSY_TIFF_COMPRESSIONS
            else:
                lossless = kind in LOSSLESS_FORMATS or (kind == "webp" and webp_is_lossless(data))
            return ItemInfo(kind, img.height, img.width, quality, lossless)
    except Exception:
        return ItemInfo()


def webp_is_lossless(data: bytes) -> bool:
    """Whether WebP bytes hold a lossless (``VP8L``) image: walks the RIFF chunks; a lossy
    ``VP8 `` chunk (alone, or with an alpha or animation chunk) makes it lossy."""
    offset, lossless = 12, False
    while offset + 8 <= len(data):
        fourcc, size = data[offset : offset + 4], struct.unpack("<I", data[offset + 4 : offset + 8])[0]
        if fourcc == b"VP8 ":
            return False
        lossless |= fourcc == b"VP8L"
        offset += 8 + size + (size & 1)
    return lossless


@lru_cache(maxsize=1)
def _libjpeg_luma_tables() -> np.ndarray:
    """The luminance quantisation table libjpeg writes at each quality 1-100 (row q-1), read back
    from encodings of a blank image so the tables' order is Pillow's own."""
    tables = []
    blank = Image.new("L", (8, 8))
    for quality in range(1, 101):
        buffer = io.BytesIO()
        blank.save(buffer, format="JPEG", quality=quality)
        with Image.open(buffer) as img:
            tables.append(list(img.quantization[0]))
    return np.asarray(tables, dtype=np.float64)


def estimate_jpeg_quality(quantization: dict[int, Sequence[int]]) -> float:
    """The IJG quality (1-100) whose luminance table is nearest (in log steps) to the JPEG's first
    table: exact for files libjpeg, Pillow, OpenCV or browsers wrote with a quality setting; the
    nearest equivalent for other encoders' tables."""
    if not quantization:
        return float("nan")
    table = np.asarray(list(quantization[min(quantization)]), dtype=np.float64)
    if table.size != 64:
        return float("nan")
    reference = _libjpeg_luma_tables()
    distance = np.abs(np.log(reference) - np.log(np.maximum(table, 1))).sum(1)
    return float(np.argmin(distance) + 1)


# a JPEG re-saved at its own quality barely changes ("JPEG ghost"): an item that was once a JPEG at
# quality q has a dip in its re-quantisation error at q, a pristine item none (measured in
# docs/benchmarks.md: content_variants). The dip must be below GHOST_DEPTH of both neighbours two
# qualities away and the error below GHOST_FLOOR (squared 8-bit steps).
GHOST_DEPTH, GHOST_FLOOR, GHOST_LOWEST = 0.75, 16.0, 18


def jpeg_history_quality(item: np.ndarray, below: float) -> float:
    """The quality of a JPEG that the uint8 ``item`` (C, H, W) was once saved as, when its luma
    still carries that JPEG's quantisation at a quality below ``below``; NaN when it carries none.

    For items that arrive in a lossless format (a PNG of a JPEG, a screenshot of one): each
    quality from 18 up to ``below`` + 2 re-quantises the item's 8x8 luma blocks with libjpeg's
    table at that quality (the orthonormal DCT JPEG uses), and an item saved at quality q comes
    back almost unchanged at q and not at its neighbours."""
    pixels = np.asarray(item, dtype=np.float64)
    luma = pixels[0] if pixels.shape[0] == 1 else np.round(pixels[:3].transpose(1, 2, 0) @ [0.299, 0.587, 0.114])
    h, w = luma.shape[0] // 8 * 8, luma.shape[1] // 8 * 8
    qualities = np.arange(GHOST_LOWEST, int(min(below, 98)) + 3)
    if h == 0 or w == 0 or len(qualities) < 5:
        return float("nan")
    blocks = (luma[:h, :w] - 128).reshape(h // 8, 8, w // 8, 8).transpose(0, 2, 1, 3).reshape(-1, 8, 8)
    steps = _libjpeg_luma_tables()[qualities - 1].reshape(len(qualities), 1, 8, 8)
    coefficients = dctn(blocks, axes=(1, 2), norm="ortho")[None]
    again = np.clip(np.round(idctn(np.round(coefficients / steps) * steps, axes=(2, 3), norm="ortho") + 128), 0, 255)
    error = ((again - (blocks + 128)) ** 2).mean(axis=(1, 2, 3))
    inner = error[2:-2]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = inner / np.minimum(error[:-4], error[4:])
    ratio[~np.isfinite(ratio)] = np.inf
    # the deepest dip of the lowest run of neighbouring qualities that dip: a JPEG's pixels also come
    # back almost unchanged at higher qualities whose steps nearly divide its own (a q55 item dips at
    # 78 and 86 too), never at lower ones; neighbours share most steps (a q70 item dips at 69 too)
    dips = np.flatnonzero((ratio < GHOST_DEPTH) & (inner < GHOST_FLOOR))
    if not len(dips):
        return float("nan")
    run = dips[: int(np.argmax(np.diff(np.r_[dips, dips[-1] + 2]) > 1)) + 1]
    quality = float(qualities[run[np.argmin(ratio[run])] + 2])
    return quality if quality < below else float("nan")


NPY_MAGIC = b"\x93NUMPY"


def _npy_header(buffer: io.BytesIO) -> tuple:
    """(shape, fortran_order, dtype) of the ``.npy`` bytes in ``buffer``, read without the data."""
    version = np.lib.format.read_magic(buffer)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return reader(buffer)


def _npy_array(data: bytes, max_bytes: int) -> np.ndarray:
    """An ``.npy`` item, its header checked against the bytes actually present before allocating."""
    buffer = io.BytesIO(data)
    try:
        shape, _, dtype = _npy_header(buffer)
    except (ValueError, SyntaxError, EOFError) as exc:
        raise DataError(f"not a readable .npy array ({exc})") from exc
    if dtype.hasobject:
        raise DataError("object arrays are refused (they would need unpickling)")
    declared = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if declared > max_bytes or declared != len(data) - buffer.tell():
        raise DataError(f".npy header declares {declared} bytes of data, the item holds {len(data) - buffer.tell()}")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError) as exc:
        raise DataError(f"not a readable .npy array ({exc})") from exc


def decode_item(data: bytes, shape: Sequence[int], max_bytes: int = 64 * 2**20,
                value_range: tuple[float, float] | None = None) -> np.ndarray:
    """One item for a generator with output ``shape``: image bytes (:func:`decode_image`), or
    ``.npy`` bytes of a uint8 image / float array in the output range. Returns uint8 (pixels) or
    float32 (output range); raises ``DataError`` saying what is wrong. Float arrays must be
    finite and, when ``value_range`` is given, inside it: a NaN must never look like a sample."""
    if len(data) > max_bytes:
        raise DataError(f"item of {len(data)} bytes exceeds the limit of {max_bytes}")
    if data[:6] == NPY_MAGIC:
        arr = _npy_array(data, max_bytes)
        if arr.dtype.kind in "ui" and arr.dtype != np.uint8:
            if arr.size and (arr.min() < 0 or arr.max() > 255):
                raise DataError("integer arrays must hold 8-bit pixel values (0-255)")
            arr = arr.astype(np.uint8)
        elif arr.dtype.kind == "f":
            if not np.isfinite(arr).all():
                raise DataError("the array holds NaN or infinite values")
            if value_range is not None and arr.size:
                low, high = value_range
                slack = 1e-3 * (high - low)
                if arr.min() < low - slack or arr.max() > high + slack:
                    raise DataError(f"float values span [{arr.min():.4g}, {arr.max():.4g}], outside the generator's "
                                    f"output range [{low:g}, {high:g}]")
            arr = arr.astype(np.float32)
        elif arr.dtype != np.uint8:
            raise DataError(f"array of dtype {arr.dtype} is not an image or a numeric record")
    else:
        arr = decode_image(data, channels=shape[0] if len(shape) == 3 else None)
    if len(shape) == 3 and arr.ndim == 2:
        arr = arr[None]
    if tuple(arr.shape) != tuple(shape):
        raise DataError(f"item has shape {tuple(arr.shape)}, the generator produces {tuple(shape)}")
    return arr


def _is_gray(img: Image.Image) -> bool:
    if img.mode != "P":
        return True
    palette = img.convert("RGB")
    arr = np.asarray(palette)
    return bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all())


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """All PNG/JPEG/WebP files below ``folder`` (any nesting), in sorted order."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_images(path: str | os.PathLike, channels: int | None = None, limit: int | None = None) -> np.ndarray:
    """Load images from a folder (PNG/JPEG), an ``.npy``/``.npz`` array or an IDX file as uint8 (N, C, H, W).

    All images must share one size; a mismatch raises ``DataError`` naming the file.
    """
    path = Path(path)
    if path.is_dir():
        files = list_image_files(path)[:limit]
        if not files:
            raise DataError(f"no PNG/JPEG images found under {path}")
        arrays = []
        for file in files:
            try:
                arr = decode_image(file.read_bytes(), channels)
            except DataError as exc:
                raise DataError(f"{file}: {exc}; remove or fix the file") from exc
            if arrays and arr.shape != arrays[0].shape:
                raise DataError(f"{file} has shape {arr.shape}, but {files[0]} has {arrays[0].shape}")
            channels = arr.shape[0]
            arrays.append(arr)
        return np.stack(arrays)
    arr = load_array(path)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise DataError(f"{path}: expected images shaped (N, C, H, W), (N, H, W) or (N, H, W, C), got {arr.shape}")
    if arr.shape[1] not in (1, 3) and arr.shape[-1] in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.min() >= 0 and arr.max() <= 1:
            arr = np.floor(arr * 255 + 0.5)
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr[:limit])


def load_array(path: str | os.PathLike) -> np.ndarray:
    """Load an ``.npy``, ``.npz`` (first array), IDX (optionally gzipped) or CSV file without unpickling."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    name = path.name.lower()
    try:
        if name.endswith(".npy"):
            return np.load(path, allow_pickle=False)
        if name.endswith(".npz"):
            with np.load(path, allow_pickle=False) as npz:
                if not npz.files:
                    raise DataError(f"{path} holds no arrays")
                return npz[npz.files[0]]
        if name.endswith(".csv"):
            return load_table(path)
        if "idx" in name:
            return load_idx(path)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path} could not be read ({exc})") from exc
    raise DataError(f"{path}: unsupported file type; use a folder of PNG/JPEG, .npy, .npz, .csv or an IDX file")


def load_table(path: str | os.PathLike) -> np.ndarray:
    """Load a numeric CSV (an optional header row is skipped) as float32 (N, D)."""
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        first = fh.readline()
    try:
        [float(v) for v in first.strip().split(",")]
        skip = 0
    except ValueError:
        skip = 1
    try:
        arr = np.loadtxt(path, delimiter=",", skiprows=skip, dtype=np.float32, ndmin=2)
    except ValueError as exc:
        raise DataError(f"{path}: every value must be numeric ({exc})") from exc
    if not np.isfinite(arr).all():
        raise DataError(f"{path} contains NaN or infinite values")
    return arr


def load_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}.get(raw[2])
    if dtype is None:
        raise DataError(f"{path}: unknown IDX data type {raw[2]:#x}")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims)


def read_fashion_mnist(root: str | os.PathLike, split: str = "train", size: int = 32, limit: int | None = None) -> np.ndarray:
    """Fashion-MNIST images from the folder ``root`` (its gzipped IDX files) as uint8
    (N, 1, size, size), resized bilinearly from 28x28. Where the data lives is the caller's
    business (``flows.datasets`` finds or fetches it)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    path = Path(root) / f"{prefix}-images-idx3-ubyte.gz"
    if not path.is_file():
        raise DataError(f"{path} does not exist; point at a folder holding Fashion-MNIST's IDX files")
    images = load_idx(path)[:limit]
    return resize_images(images[:, None], size)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 (N, C, H, W) images to size x size with PIL's bilinear filter."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return np.ascontiguousarray(images)
    out = np.empty((*images.shape[:2], size, size), dtype=np.uint8)
    for i, img in enumerate(images):
        for c, plane in enumerate(img):
            out[i, c] = np.asarray(Image.fromarray(plane).resize((size, size), Image.BILINEAR))
    return out


def quantize(x: torch.Tensor, low: float, high: float) -> np.ndarray:
    """Quantise samples in [low, high] to uint8 exactly as saving them as a PNG would."""
    unit = (x.detach().float().cpu() - low) / (high - low)
    return torch.clamp(torch.floor(unit * 255 + 0.5), 0, 255).to(torch.uint8).numpy()


def to_output_range(samples: np.ndarray | torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Float samples in a generator's output range ``[low, high]``: uint8 pixels are mapped from
    [0, 255] (the inverse of :func:`quantize` up to rounding); floats pass through."""
    t = torch.as_tensor(np.ascontiguousarray(samples)) if isinstance(samples, np.ndarray) else samples
    if t.dtype == torch.uint8:
        return t.float().div(255.0).mul(high - low).add(low)
    return t.float()


def check_sample_shape(samples: np.ndarray | torch.Tensor, expected: Sequence[int], what: str = "input") -> None:
    """Raise ``DataError`` naming both shapes when samples do not match the generator's output."""
    got = tuple(samples.shape[1:])
    if got != tuple(expected):
        raise DataError(
            f"{what} samples have shape {got} per item, but the generator produces {tuple(expected)}; "
            "resize or convert them (channels, height, width) to match"
        )


def load_dataset(path: str | os.PathLike, shape: Sequence[int], limit: int | None = None) -> np.ndarray:
    """Load items for a generator with output ``shape`` (images: uint8 (N, C, H, W); records: (N, D)),
    checking that they match it."""
    if len(shape) == 3:
        data = load_images(path, channels=shape[0], limit=limit)
    else:
        data = load_array(path)[:limit].astype(np.float32)
    check_sample_shape(data, shape, what=str(path))
    return data


def encode_item(item: np.ndarray) -> bytes:
    """One item as bytes: a PNG for uint8 (C, H, W) images, ``.npy`` (no pickle) otherwise."""
    buffer = io.BytesIO()
    if item.dtype == np.uint8 and item.ndim == 3 and item.shape[0] in (1, 3):
        Image.fromarray(item[0] if item.shape[0] == 1 else item.transpose(1, 2, 0)).save(buffer, format="PNG")
    else:
        np.save(buffer, item, allow_pickle=False)
    return buffer.getvalue()


def pixel_stats(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per item, the mean and standard deviation of its values (pixels in 0-255 for uint8 images)."""
    flat = np.asarray(samples).reshape(len(samples), -1).astype(np.float64)
    return flat.mean(1), flat.std(1)
