"""Image perturbations content meets in the wild and the paper's robustness protocol (Table 3), on uint8 (N, C, H, W) images."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

__all__ = ["PERTURBATIONS", "perturb"]


def _per_image(images: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    out = np.empty_like(images)
    for i, image in enumerate(images):
        mode = "L" if image.shape[0] == 1 else "RGB"
        pil = Image.fromarray(image[0] if mode == "L" else image.transpose(1, 2, 0), mode)
        result = np.asarray(fn(pil))
        out[i] = result[None] if mode == "L" else result.transpose(2, 0, 1)
    return out


def jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    def encode(pil: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buffer.getvalue())).convert(pil.mode)

    return _per_image(images, encode)


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    return _per_image(images, lambda pil: pil.filter(ImageFilter.GaussianBlur(sigma)))


def crop(images: np.ndarray, fraction: float) -> np.ndarray:
    """Centre crop to ``fraction`` of the side, resized back (bilinear)."""

    def crop_resize(pil: Image.Image) -> Image.Image:
        w, h = pil.size
        cw, ch = round(w * fraction), round(h * fraction)
        left, top = (w - cw) // 2, (h - ch) // 2
        return pil.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BILINEAR)

    return _per_image(images, crop_resize)


def noise(images: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """Additive Gaussian noise of standard deviation ``sigma`` in units of the [0, 1] range."""
    rng = np.random.default_rng(seed)
    noisy = images.astype(np.float64) + rng.normal(0.0, sigma * 255.0, images.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


# name -> (kind, strength, function); strengths as in the paper's Table 3 where it states them
PERTURBATIONS: dict[str, tuple[str, float, Callable[[np.ndarray], np.ndarray]]] = {
    "jpeg q95": ("jpeg", 95, lambda x: jpeg(x, 95)),
    "jpeg q90": ("jpeg", 90, lambda x: jpeg(x, 90)),
    "jpeg q80": ("jpeg", 80, lambda x: jpeg(x, 80)),
    "jpeg q70": ("jpeg", 70, lambda x: jpeg(x, 70)),
    "blur s0.5": ("blur", 0.5, lambda x: blur(x, 0.5)),
    "blur s1": ("blur", 1.0, lambda x: blur(x, 1.0)),
    "crop 0.9": ("crop", 0.9, lambda x: crop(x, 0.9)),
    "crop 0.8": ("crop", 0.8, lambda x: crop(x, 0.8)),
    "noise s0.01": ("noise", 0.01, lambda x: noise(x, 0.01)),
    "noise s0.05": ("noise", 0.05, lambda x: noise(x, 0.05)),
}


def perturb(images: np.ndarray, name: str) -> np.ndarray:
    """``images`` (uint8 (N, C, H, W)) under the named perturbation; a PNG of a JPEG is the JPEG's
    pixels, so the JPEG entries cover it."""
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; use one of {', '.join(PERTURBATIONS)}")
    return PERTURBATIONS[name][2](images)
