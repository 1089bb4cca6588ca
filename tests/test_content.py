"""Content as it arrives: WebP and JPEG re-encodings, near-grey colour, estimated JPEG quality,
and checkpoints as GAN code ships them."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from flipad import load_generator
from flipad.generators.loading import GeneratorLoadError
from flipad.io.data import DataError, decode_item, item_info, jpeg_history_quality, list_image_files
from flipad.scoring import undecided_reason

SMALL = dict(latent_dim=16, channels=1, image_size=32, width=8)


def _encode(pixels: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_near_grey_webp_of_a_grey_image_is_read_as_its_luma(fashion_test):
    """Lossy WebP stores YUV: a grey image comes back as RGB with channels 1 apart. It is scored
    as grey (within a step of the original), not refused; lossless WebP is exact."""
    for image in fashion_test[:20, 0]:
        for options in (dict(quality=80), dict(quality=50), dict(lossless=True)):
            data = _encode(image, "WEBP", **options)
            assert Image.open(io.BytesIO(data)).mode == "RGB"
            decoded = decode_item(data, (1, 32, 32))
            lossy = np.abs(decoded[0].astype(int) - _roundtrip(image, options))
            assert lossy.max() <= 1
            if options.get("lossless"):
                np.testing.assert_array_equal(decoded[0], image)


def _roundtrip(image: np.ndarray, options: dict) -> np.ndarray:
    """What the codec itself returns for ``image``, as grey (the channels' mean)."""
    back = np.asarray(Image.open(io.BytesIO(_encode(image, "WEBP", **options))).convert("RGB")).astype(int)
    return back.mean(-1).round().astype(int)


def test_a_truly_colour_item_is_refused_for_a_grey_generator_with_its_reason(fashion_test):
    grey = fashion_test[0, 0]
    tinted = np.stack([grey, (grey * 0.6).astype(np.uint8), grey], -1)
    for data in (_encode(tinted, "PNG"), _encode(tinted, "WEBP", quality=80), _encode(tinted, "JPEG", quality=90)):
        with pytest.raises(DataError, match="colour image .* mean channel spread"):
            decode_item(data, (1, 32, 32))
    # an RGB JPEG (4:2:0) of a grey image is near-grey: scored
    assert decode_item(_encode(np.stack([grey] * 3, -1), "JPEG", quality=60, subsampling=2), (1, 32, 32)).shape == (1, 32, 32)


def test_webp_files_are_listed_with_png_and_jpeg(tmp_path, fashion_test):
    for name, fmt in (("a.png", "PNG"), ("b.jpg", "JPEG"), ("c.webp", "WEBP"), ("d.txt", None)):
        (tmp_path / name).write_bytes(_encode(fashion_test[0, 0], fmt) if fmt else b"x")
    assert [p.name for p in list_image_files(tmp_path)] == ["a.png", "b.jpg", "c.webp"]


@pytest.mark.parametrize("subsampling", [0, 2])
def test_jpeg_quality_is_estimated_from_the_quantisation_tables(fashion_test, subsampling):
    rgb = np.stack([fashion_test[1, 0]] * 3, -1)
    for quality in (95, 90, 80, 70, 60, 50, 40, 20):
        info = item_info(_encode(rgb, "JPEG", quality=quality, subsampling=subsampling))
        assert (info.format, info.height, info.width, info.jpeg_quality) == ("jpeg", 32, 32, quality)
    png = item_info(_encode(fashion_test[1, 0], "PNG"))
    assert png.format == "png" and np.isnan(png.jpeg_quality)
    assert item_info(b"not an image").format == ""


def test_the_container_says_whether_pixels_arrived_exactly(fashion_test):
    grey = fashion_test[1, 0]
    rgba = np.dstack([np.stack([grey] * 3, -1), np.full_like(grey, 200)])
    lossless = {"PNG": {}, "BMP": {}, "TIFF": {}, "WEBP": dict(lossless=True)}
    lossy = {"JPEG": dict(quality=95), "WEBP": dict(quality=90)}
    for fmt, options in lossless.items():
        assert item_info(_encode(grey, fmt, **options)).lossless, fmt
    for fmt, options in lossy.items():
        assert not item_info(_encode(grey, fmt, **options)).lossless, fmt
    assert item_info(_encode(rgba, "WEBP", lossless=True)).lossless  # VP8X + VP8L
    assert not item_info(_encode(rgba, "WEBP", quality=90)).lossless  # VP8X + ALPH + VP8
    assert not item_info(_encode(grey, "TIFF", compression="jpeg")).lossless
    buffer = io.BytesIO()
    np.save(buffer, grey[None])
    assert item_info(buffer.getvalue()).lossless
    assert not item_info(b"not an image").lossless


def test_undecided_below_the_lowest_calibrated_quality_only(fashion_test):
    image = fashion_test[2, 0]
    assert undecided_reason(item_info(_encode(image, "JPEG", quality=70)), 70.0) == ""
    reason = undecided_reason(item_info(_encode(image, "JPEG", quality=60)), 70.0)
    assert "estimated quality 60" in reason and "(70)" in reason
    assert undecided_reason(item_info(_encode(image, "JPEG", quality=40)), None) == ""  # nothing calibrated
    assert undecided_reason(item_info(_encode(image, "PNG")), 70.0) == ""


def _decoded(data: bytes, mode: str) -> np.ndarray:
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert(mode))
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def test_a_png_of_a_low_quality_jpeg_is_recognised_by_its_quantisation(fashion_test):
    """A PNG of a JPEG keeps the JPEG's quantisation: saved again at its own quality it barely
    changes. Found below the calibrated quality (then undecided), never in pristine or WebP items
    or in JPEGs at or above it (measured over 300 items per source in docs/benchmarks.md)."""
    found, pristine = [], []
    for image in fashion_test[10:60, 0]:
        pristine.append(jpeg_history_quality(image[None], 70.0))
        pristine.append(jpeg_history_quality(_decoded(_encode(image, "WEBP", quality=60), "L"), 70.0))
        pristine.append(jpeg_history_quality(_decoded(_encode(image, "JPEG", quality=80), "L"), 70.0))
        found.append(jpeg_history_quality(_decoded(_encode(image, "JPEG", quality=55), "L"), 70.0))
    assert np.isnan(pristine).all()
    assert np.mean(np.array(found) == 55) >= 0.85 and np.nanmax(found) < 70
    grey_rgb = np.stack([fashion_test[5, 0]] * 3, -1)  # RGB items: read on their luma
    assert jpeg_history_quality(_decoded(_encode(grey_rgb, "JPEG", quality=50, subsampling=2), "RGB"), 70.0) == 50
    colour = np.stack([fashion_test[5, 0], fashion_test[6, 0], fashion_test[7, 0]], -1)
    assert np.isnan(jpeg_history_quality(colour.transpose(2, 0, 1), 70.0))
    png_of_jpeg = item_info(_encode(fashion_test[12, 0], "PNG"))
    reason = undecided_reason(replace(png_of_jpeg, jpeg_quality=55.0), 70.0)
    assert reason.startswith("PNG that was a JPEG of estimated quality 55") and "(70)" in reason


def test_a_lossless_item_is_searched_for_a_jpeg_trace_at_every_quality(fashion_test):
    """What decides whether a PNG is judged as lossless: a trace of a JPEG at any quality up to 98,
    reported as the lowest quality that dips (higher ones whose steps nearly divide its own dip
    too). Measured in docs/design.md ("Lossless items are judged against the unaltered own items")."""
    from flows.photos import photo_patches

    grey = fashion_test[60:110]
    assert all(np.isnan(jpeg_history_quality(x, 99.0)) for x in grey)
    for quality in (95, 90, 80):
        found = [jpeg_history_quality(_decoded(_encode(x[0], "JPEG", quality=quality), "L"), 99.0) for x in grey]
        assert np.mean(np.array(found) == quality) >= 0.95, quality
    low = [jpeg_history_quality(_decoded(_encode(x[0], "JPEG", quality=55), "L"), 99.0) for x in grey]
    assert np.mean(np.array(low) < 70) >= 0.85  # still below the calibrated range: undecided
    photos = photo_patches(64, 40, seed=3, split="test")
    assert all(np.isnan(jpeg_history_quality(x, 99.0)) for x in photos)
    found = [jpeg_history_quality(_decoded(_encode(x.transpose(1, 2, 0), "JPEG", quality=90, subsampling=0), "RGB"), 99.0)
             for x in photos]
    assert np.mean(~np.isnan(found)) >= 0.9


def _tensors(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.clone().contiguous() for k, v in module.state_dict().items()}


def test_checkpoints_as_gan_code_ships_them_load(tmp_path):
    module = load_generator("dcgan", **SMALL)
    discriminator = {"conv.weight": torch.zeros(2, 2), "conv.bias": torch.zeros(2)}
    nested = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 25, "netG_state_dict": _tensors(module, "module."), "netD_state_dict": discriminator,
                "optimizerG": {"state": {}, "param_groups": [{"lr": 2e-4}]}}, nested)
    compiled = tmp_path / "compiled.safetensors"
    save_file(_tensors(module, "_orig_mod."), str(compiled))
    both = tmp_path / "ema.pt"
    torch.save({"generator": _tensors(module), "g_ema": _tensors(module, "module.")}, both)
    for path, key in ((nested, None), (compiled, None), (both, "g_ema"), (both, "generator")):
        loaded = load_generator("dcgan", path, weights_key=key, **SMALL)
        for name, value in module.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], value), (path.name, name)


def test_an_ambiguous_checkpoint_fails_in_one_line_naming_its_keys_and_the_option(tmp_path):
    module = load_generator("dcgan", **SMALL)
    both = tmp_path / "ema.pt"
    torch.save({"generator": _tensors(module), "g_ema": _tensors(module)}, both)
    with pytest.raises(GeneratorLoadError) as caught:
        load_generator("dcgan", both, **SMALL)
    message = str(caught.value)
    assert "\n" not in message and "generator, g_ema" in message and "--weights-key" in message
    with pytest.raises(GeneratorLoadError, match="no state dict under that key .*generator, g_ema"):
        load_generator("dcgan", both, weights_key="netG", **SMALL)
