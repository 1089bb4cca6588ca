"""``flipad demo``: the whole story on the embedded default (local MLflow store, Prefect's own server).

Takes the two small DCGANs it ships (trained on Fashion-MNIST by :func:`demo_generator` itself;
other training lengths, or ``retrain``, train them here), onboards the first through ``onboard_generator`` with
the default detector (registered in MLflow), then attributes a mixed folder through
``attribute_stream``: the generator's own new samples as PNG, re-saved as JPEG q90 and q80 and as
a PNG of a JPEG; real images; a look-alike generator (the same architecture trained from another
seed); and a broken file.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from safetensors.torch import load_file, save

from flipad.generators.architectures import DCGANGenerator
from flipad.generators.sampling import generate_samples
from flipad.generators.training import train_gan
from flipad.io.data import DataError, encode_item, read_fashion_mnist
from flipad.io.files import atomic_write
from flipad.io.perturb import perturb
from monitoring.monitors import report_lines

from .attribute import AttributeConfig, attribute_stream
from .datasets import ensure_fashion_mnist
from .onboard import OnboardConfig, headline, onboard_generator

logger = logging.getLogger(__name__)

DEMO_GENERATOR = dict(latent_dim=64, channels=1, image_size=32, width=32)
DEMO_MODEL = "fashion-dcgan"
DEMO_LATENT = (64, 1, 1)
STREAM_SEED = 9000  # the onboarding flow draws with seeds 1000-5000: these samples are new to it
# the demo's budget (10 minutes on two cores from a fresh clone): briefly trained challengers; the
# latent search's encoder trains 600 steps, as `flipad onboard`'s default does
DEMO_ENCODER_STEPS = 600
DEMO_CHALLENGER_STEPS = 200
# the demo generators as trained by demo_generator (seeds 0 and 1, 1,000 steps, torch 2.13.0 CPU,
# 2026-12-02): shipped so that the demo's ten minutes go to the product, not to training GANs
SHIPPED = Path(__file__).with_name("demo_generators")
SHIPPED_SHA256 = {
    "generator-seed0-steps1000.safetensors": "710e97cd1e018ba994872b7ae71be9d9943f05dc56b76f3bcc70d17ae6b60cfa",
    "generator-seed1-steps1000.safetensors": "452e8b559c779b27ffce2fa5d980c6145bc0d23060e663e51e6eb3fb646495b6",
}


def demo_generator(workdir: Path, seed: int, steps: int, real: np.ndarray, device: str,
                   retrain: bool = False) -> tuple[DCGANGenerator, Path]:
    """The demo's DCGAN trained on ``real`` for ``steps``, and its weights file in ``workdir``:
    cached there, else copied from the shipped ones (unless ``retrain``), else trained."""
    path = workdir / f"generator-seed{seed}-steps{steps}.safetensors"
    generator = DCGANGenerator(**DEMO_GENERATOR)
    shipped = SHIPPED / path.name
    if retrain:
        path.unlink(missing_ok=True)
    elif not path.is_file() and shipped.name in SHIPPED_SHA256:
        data = shipped.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != SHIPPED_SHA256[shipped.name]:
            raise DataError(f"{shipped} is not the shipped demo generator (sha256 {digest}); "
                             "restore it from the repository or run the demo with --retrain")
        atomic_write(path, data)
        logger.info("demo generator seed %d: the shipped weights %s", seed, shipped)
    if path.is_file():
        generator.load_state_dict(load_file(str(path)))
        return generator.eval(), path
    generator = train_gan(generator, real, steps=steps, seed=seed, device=device)
    atomic_write(path, save({k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}))
    return generator, path


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """One uint8 (C, H, W) image as a JPEG of ``quality`` (PIL's default chroma subsampling: 4:2:0 for colour)."""
    buffer = io.BytesIO()
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def write_stream(folder: Path, sources: dict[str, np.ndarray], jpeg_sources: dict[str, tuple[np.ndarray, int]]) -> None:
    """One sub-folder of PNGs per source, one of JPEGs per ``jpeg_sources`` entry (images, quality), plus a broken file."""
    for name, images in sources.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            (folder / name / f"{i:05d}.png").write_bytes(encode_item(image))
    for name, (images, quality) in jpeg_sources.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            (folder / name / f"{i:05d}.jpg").write_bytes(encode_jpeg(image, quality))
    write_broken(folder, sources["real"][0])


def write_broken(folder: Path, item: np.ndarray) -> None:
    """``folder/broken/truncated.png``: the first 40 bytes of ``item``'s PNG, a file no decoder reads."""
    (folder / "broken").mkdir(parents=True, exist_ok=True)
    (folder / "broken" / "truncated.png").write_bytes(encode_item(item)[:40])


def source_table(rows: pd.DataFrame, stream: Path) -> pd.DataFrame:
    """Per stream sub-folder: items, how many were attributed to the generator, errors."""
    rows = rows.assign(source=[Path(u).relative_to(stream.resolve()).parts[0] for u in rows["uri"]])
    return rows.groupby("source").agg(
        items=("uri", "size"),
        attributed=("is_generated", lambda s: int((s == True).sum())),  # noqa: E712 (object column with None)
        errors=("error", lambda s: int((s != "").sum())),
    ).assign(attributed_fraction=lambda t: (t["attributed"] / (t["items"] - t["errors"]).clip(lower=1)).round(4))


def run_demo(workdir: Path, num_samples: int, num_validation: int, num_test: int, num_stream: int, train_steps: int,
             device: str, retrain: bool = False, encoder_steps: int = DEMO_ENCODER_STEPS) -> str:
    """Run the demo and return a printable report."""
    start = time.perf_counter()
    workdir = workdir.resolve()
    root = ensure_fashion_mnist()
    train_real = read_fashion_mnist(root, "train", 32, limit=20_000)
    test_real = read_fashion_mnist(root, "test", 32)
    _, weights = demo_generator(workdir, 0, train_steps, train_real, device, retrain)
    other, _ = demo_generator(workdir, 1, train_steps, train_real, device, retrain)
    real_path = workdir / "real-train.npy"
    np.save(real_path, np.concatenate([train_real[-num_samples:], test_real[: num_test * 2]]))

    onboarded = onboard_generator(OnboardConfig(
        name=DEMO_MODEL, generator="dcgan", weights=str(weights), generator_kwargs=DEMO_GENERATOR,
        real=str(real_path), num_samples=num_samples, num_validation=num_validation, num_test=num_test,
        num_challenger=num_test, challenger_steps=DEMO_CHALLENGER_STEPS, device=device,
        family_settings={"reconstruction": {"n_perturbed": num_validation // 2, "encoder_steps": encoder_steps}},
    ))
    detector = onboarded.detector
    own = detector.generate(num_stream, seed=STREAM_SEED)
    stream = workdir / "stream"
    write_stream(stream, {
        "own": own,
        "own-png-of-jpeg-q80": perturb(own, "jpeg q80"),
        "real": test_real[-num_stream:],
        "lookalike-generator": generate_samples(other, DEMO_LATENT, num_stream, STREAM_SEED, detector.sample_range),
    }, {"own-jpeg-q90": (own, 90), "own-jpeg-q80": (own, 80)})
    attributed = attribute_stream(AttributeConfig(
        models=(f"{DEMO_MODEL}/{onboarded.version}",), input=str(stream), output=str(workdir / "results.csv"),
    ))
    rows = attributed.rows[(attributed.rows["model"] == DEMO_MODEL) & (attributed.rows["version"].astype(str) == onboarded.version)]
    lines = [
        f"onboarded {DEMO_MODEL} version {onboarded.version} ({onboarded.alias}), {detector.description}; "
        f"{headline(onboarded.metrics, onboarded.results, detector.fnr[0])}",
        onboarded.results.to_string(index=False),
        "",
        f"attributed {stream} -> {workdir / 'results.csv'} ({attributed.new_rows} new rows, {attributed.seconds:.0f} s):",
        source_table(rows, stream).to_string(),
    ]
    for name, summary in attributed.drift.items():
        lines += ["monitoring against the onboarding reference:", *report_lines(name, summary, attributed.reports[name])]
    lines += [f"MLflow run: {onboarded.run_url}", f"open the MLflow UI on the same store: {onboarded.ui_command}",
              f"total {time.perf_counter() - start:.0f} s"]
    return "\n".join(lines)
