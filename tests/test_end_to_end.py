"""End to end: a generator trained briefly on Fashion-MNIST, its detector, held-out accuracy."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from flipad import FlipadDetector, GeneratorAdapter
from flipad.deepsad import DeepSADConfig
from flipad.evaluation import evaluate_pairs
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
def test_cli_demo_runs_and_reports_accuracy(tmp_path):
    result = CliRunner().invoke(
        app,
        ["demo", "--workdir", str(tmp_path), "--num-samples", "150", "--num-test", "100", "--train-steps", "40"],
    )
    assert result.exit_code == 0, result.output
    rows = re.findall(r"^(real \(Fashion-MNIST test\)|same architecture, other seed)\s+([0-9.]+)\s+([0-9.]+)$",
                      result.output, flags=re.M)
    assert len(rows) == 2, result.output
    for _, acc, auc in rows:
        assert 0.0 <= float(acc) <= 1.0 and 0.0 <= float(auc) <= 1.0
    assert (tmp_path / "detector" / "config.json").is_file()


def test_cli_help_lists_the_demo():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output
