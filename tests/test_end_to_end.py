"""End to end: a generator trained briefly on Fashion-MNIST, its detector, held-out accuracy."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from flipad import FlipadDetector, GeneratorAdapter
from flipad.detectors.deepsad import DeepSADConfig
from flipad.detectors.evaluation import evaluate_pairs
from flows.cli import app


@pytest.mark.slow
def test_detector_separates_own_samples_from_real_images(trained_generator, fashion_train, fashion_test):
    adapter = GeneratorAdapter.from_module(trained_generator, device="cpu", anchor_samples=2000)
    det = FlipadDetector(
        adapter,
        n_generated=600,
        n_validation=400,
        deep_sad=DeepSADConfig(epochs=15, lr_milestones=(10,)),
        progress=False,
    ).fit(real=fashion_train[-600:])
    own_test = adapter.generate(300, seed=123)
    (pair,) = evaluate_pairs(det, own_test, {"real": fashion_test[:300]})
    assert pair.balanced_accuracy >= 0.95, pair
    assert pair.auc >= 0.98, pair
    assert det.fit_info_["inversion"]["iterations_median"] > 0


@pytest.mark.slow
def test_cli_demo_runs_on_the_embedded_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the embedded MLflow store lands in the working directory
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = CliRunner().invoke(
        app,
        ["demo", "--workdir", "work", "--num-samples", "150", "--num-validation", "60", "--num-test", "30",
         "--num-stream", "20", "--train-steps", "40", "--encoder-steps", "40"],
    )
    assert result.exit_code == 0, result.output
    assert "onboarded fashion-dcgan version 1 (champion)" in result.output and "worst source" in result.output
    folders = ("own", "own-jpeg-q90", "own-jpeg-q80", "own-png-of-jpeg-q80", "real", "lookalike-generator", "broken")
    table = dict(re.findall(rf"^({'|'.join(folders)})\s+(\d+\s+\d+\s+\d+)", result.output, flags=re.M))
    assert set(table) == set(folders), result.output
    counts = {k: [int(v) for v in row.split()] for k, row in table.items()}  # items, attributed, errors
    assert counts["broken"] == [1, 0, 1] and all(counts[k][0] == 20 and counts[k][2] == 0 for k in folders[:-1])
    rows = pd.read_csv(tmp_path / "work" / "results.csv", keep_default_na=False)
    assert len(rows) == 121 and (tmp_path / "mlflow.db").is_file()
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path.resolve() / 'mlflow.db'}" in result.output


def test_the_demo_takes_its_shipped_generators_and_refuses_altered_ones(tmp_path, monkeypatch):
    import shutil

    import flows.demo as demo
    from flipad.io.data import DataError

    no_data = np.zeros((0, 1, 32, 32), np.uint8)  # training on it would fail: the shipped weights must be used
    generator, path = demo.demo_generator(tmp_path / "work", 0, 1000, no_data, "cpu")
    assert path == tmp_path / "work" / "generator-seed0-steps1000.safetensors"
    assert path.read_bytes() == (demo.SHIPPED / path.name).read_bytes()
    with torch.no_grad():
        images = generator(torch.randn(64, *demo.DEMO_LATENT, generator=torch.Generator().manual_seed(0)))
    assert images.shape == (64, 1, 32, 32) and images.std(0).mean() > 0.1  # varied samples, not a constant
    assert demo.demo_generator(tmp_path / "work", 0, 1000, no_data, "cpu")[1] == path  # cached from now on

    altered = tmp_path / "shipped"
    shutil.copytree(demo.SHIPPED, altered)
    (altered / "generator-seed1-steps1000.safetensors").write_bytes(b"not the weights")
    monkeypatch.setattr(demo, "SHIPPED", altered)
    with pytest.raises(DataError, match="not the shipped demo generator.*--retrain") as info:
        demo.demo_generator(tmp_path / "other", 1, 1000, no_data, "cpu")
    assert "\n" not in str(info.value) and not (tmp_path / "other" / "generator-seed1-steps1000.safetensors").exists()


def test_cli_help_lists_the_demo():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output
