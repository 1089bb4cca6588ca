"""An RGB generator trained in this session on photo patches, onboarded through ``flipad onboard``
with the default detector and attributed through ``flipad attribute``: its own items as PNG,
JPEG with 4:2:0 chroma and lossy WebP are attributed; a same-architecture generator trained from
another seed is not, and neither are the smoothest real photo patches (the ones a generator
reconstructs well whether or not it made them)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from safetensors.torch import save_file
from scipy.ndimage import laplace
from typer.testing import CliRunner

from flipad.generators.architectures import DCGANGenerator
from flipad.generators.sampling import generate_samples
from flipad.generators.training import train_gan
from flipad.io.data import encode_item
from flows.cli import app
from flows.photos import photo_patches

MODEL = "test-rgb"
GENERATOR = dict(latent_dim=100, channels=3, image_size=32, width=32)
STEPS = 400  # GAN steps per generator


def _encoded(image: np.ndarray, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buffer, fmt, quality=quality)  # JPEG: PIL's default 4:2:0
    return buffer.getvalue()


@pytest.fixture(scope="session")
def rgb_generators(tmp_path_factory) -> dict:
    """Two 32x32 RGB DCGANs (latent 100) trained on photo patches from seeds 0 and 1, and the patches."""
    real = photo_patches(32, 3000, seed=0)
    root = tmp_path_factory.mktemp("rgb")
    out = {"real": real, "test": photo_patches(32, 600, seed=1, split="test")}
    for seed in (0, 1):
        module = train_gan(DCGANGenerator(**GENERATOR), real, steps=STEPS, seed=seed, device="cpu", progress=False)
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(root / f"seed{seed}.safetensors"))
        out[seed] = (module, root / f"seed{seed}.safetensors")
    return out


@pytest.mark.slow
def test_an_rgb_generator_onboards_and_its_resaved_items_are_attributed(tracking, rgb_generators, tmp_path):
    real_folder = tmp_path / "real"
    real_folder.mkdir()
    for i, item in enumerate(rgb_generators["real"][-600:]):
        (real_folder / f"{i:04d}.png").write_bytes(encode_item(item))
    runner = CliRunner()
    options = [x for k, v in GENERATOR.items() for x in ("--option", f"{k}={v}")]
    onboarded = runner.invoke(app, [
        "onboard", MODEL, "--generator", "dcgan", *options, "--weights", str(rgb_generators[0][1]),
        "--real", str(real_folder), "--num-samples", "200", "--num-validation", "150", "--num-test", "40",
        "--challenger-steps", "0", "--set", "reconstruction.encoder_steps=300", "--set", "reconstruction.n_perturbed=60"])
    assert onboarded.exit_code == 0, onboarded.output

    n = 40
    own = generate_samples(rgb_generators[0][0], (100, 1, 1), n, 424242, (-1.0, 1.0))
    other = generate_samples(rgb_generators[1][0], (100, 1, 1), n, 424243, (-1.0, 1.0))
    test = rgb_generators["test"]
    flatness = np.array([np.abs(laplace(x.astype(float).mean(0))).mean() for x in test])
    smooth = test[np.argsort(flatness)[:n]]  # the flattest tenth of held-out photos' patches
    stream = tmp_path / "stream"
    files = {"own-png": [encode_item(x) for x in own], "own-jpeg": [_encoded(x, "JPEG", 80) for x in own],
             "own-webp": [_encoded(x, "WEBP", 80) for x in own], "other-seed": [encode_item(x) for x in other],
             "smooth-real": [encode_item(x) for x in smooth]}
    for name, items in files.items():
        (stream / name).mkdir(parents=True)
        for i, data in enumerate(items):
            (stream / name / f"{i:03d}.{ {'own-jpeg': 'jpg', 'own-webp': 'webp'}.get(name, 'png')}").write_bytes(data)
    out = tmp_path / "rows.csv"
    attributed = runner.invoke(app, ["attribute", "--model", MODEL, "--input", str(stream), "--output", str(out)])
    assert attributed.exit_code == 0, attributed.output
    rows = pd.read_csv(out, keep_default_na=False)
    assert (rows["error"] == "").all(), rows.loc[rows["error"] != "", ["uri", "error"]]
    share = {name: float(rows.loc[rows["uri"].str.contains(f"/{name}/"), "verdict"].eq("attributed").mean())
             for name in files}
    assert min(share["own-png"], share["own-jpeg"], share["own-webp"]) >= 0.95, share
    assert share["other-seed"] <= 0.05 and share["smooth-real"] <= 0.05, share
