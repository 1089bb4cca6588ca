"""The benchmark suite at its smoke size: the tables' structure and ranges, not their values."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import known_sources  # noqa: E402
import flipad.io.perturb as perturb  # noqa: E402
import suite  # noqa: E402
import zoo  # noqa: E402


def test_zoo_training_is_reproducible_bit_for_bit(fashion_train, tmp_path):
    size = zoo.ZOO_SIZES["smoke"]
    first = zoo.zoo_generator("wgan-gp", 1, size, tmp_path / "a", fashion_train[:256])
    second = zoo.zoo_generator("wgan-gp", 1, size, tmp_path / "b", fashion_train[:256])
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    record = json.loads((tmp_path / "a" / "wgan-gp-s1.json").read_text())
    assert record["training"]["loss"] == "wgan-gp" and record["seed"] == 1
    reloaded = zoo.zoo_generator("wgan-gp", 1, size, tmp_path / "a", None)  # from the cache, no data needed
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), reloaded.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="train the zoo first"):
        zoo.zoo_generator("ebgan", 0, size, tmp_path / "c", None)


def test_perturbations_keep_shape_and_change_pixels():
    images = np.random.default_rng(0).integers(0, 256, (3, 1, 32, 32), dtype=np.uint8)
    for name in perturb.PERTURBATIONS:
        out = perturb.perturb(images, name)
        assert out.shape == images.shape and out.dtype == np.uint8, name
        assert not np.array_equal(out, images), name


def test_suite_smoke_run_writes_tables_results_and_plots(tmp_path):
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    doc.write_text("# Benchmarks\n\nhand-written text that must survive\n")
    args = ["--size", "smoke", "--doc", str(doc), "--out", str(tmp_path / "out"), "--zoo-cache", str(tmp_path / "zoo")]
    assert suite.main(args) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    targets = [r["target"] for r in results["results"]]
    assert targets == [zoo.generator_name(f, 0) for f in zoo.FAMILIES]
    rows = results["summary"]["table"]
    assert len(rows) == len(targets) * len(suite.KINDS) * 5  # real, three other families, the same family's seed 1
    for row in rows:
        assert 0.0 <= row["acc_mean"] <= 1.0 and 0.0 <= row["auc_mean"] <= 1.0 and row["acc_std"] >= 0.0
    assert set(results["summary"]["overall"]) == set(suite.KINDS)
    assert len(results["summary"]["robustness"]) == len(suite.KINDS) * len(perturb.PERTURBATIONS)
    assert all(0.0 <= v <= 1.0 for v in results["summary"]["robustness"].values())
    assert [r["solver"] for r in results["speed"]] == ["paper", "invert() default", "fista"]
    assert all(math.isfinite(r["seconds"]) and r["seconds"] > 0 and r["median_gap"] >= 0 for r in results["speed"])
    assert all(math.isfinite(v) and v > 0 for v in results["rates"].values())
    assert list(results["meta"]["target_s"]) == targets and all(v > 0 for v in results["meta"]["target_s"].values())
    assert 0 < results["meta"]["speed_s"] < results["meta"]["seconds"]
    smoke = suite.SUITE_SIZES["smoke"]
    assert set(results["summary"]["immunised"]) == {f"{k}|{label}" for k in suite.KINDS for label in smoke.immunised}
    assert all(0.0 <= v <= 1.0 for v in results["summary"]["immunised"].values())
    reconstruction = results["summary"]["reconstruction"]
    assert len(reconstruction) == len(targets) * 5 and all(0.0 <= v <= 1.0 for v in reconstruction.values())
    points = {(p["solver"], p["budget"]): p for p in results["convergence"]}
    assert set(points) == {(s, b) for s, budgets in suite.CONVERGENCE_BUDGETS.items() for b in budgets}
    assert all(math.isfinite(p["median_gap"]) and p["median_gap"] >= 0 and p["seconds"] > 0 for p in points.values())
    for split, count in suite.zoo_split_sizes(suite.SUITE_SIZES["smoke"]).items():
        assert len(list((tmp_path / "zoo" / "samples" / "lsgan-s1" / split).glob("*.png"))) == count

    text = doc.read_text()
    assert "hand-written text that must survive" in text
    table = [line for line in text.splitlines() if line.startswith("| ") and " | " in line]
    assert sum(line.startswith(f"| {t} |") for line in table for t in targets) == len(targets) * 5
    assert (doc.parent / "benchmarks" / "roc.png").stat().st_size > 0
    assert (doc.parent / "benchmarks" / "robustness.png").stat().st_size > 0
    assert (doc.parent / "benchmarks" / "convergence.png").stat().st_size > 0

    block = text[text.index(suite.BEGIN) : text.index(suite.END) + len(suite.END)]
    suite.update_doc(doc, block.replace("## Benchmark suite", "## Benchmark suite, rerun"))  # a rerun's section
    again = doc.read_text()
    assert again.count(suite.BEGIN) == 1 and again.count(suite.END) == 1 and "## Benchmark suite, rerun" in again
    assert "hand-written text that must survive" in again and again.count("## Benchmark suite") == 1

    # the known-sources setting on the same zoo writes its own section beside the suite's
    args = ["--size", "smoke", "--per-source", "4", "--doc", str(doc), "--out", str(tmp_path / "known"),
            "--zoo-cache", str(tmp_path / "zoo")]
    assert known_sources.main(args) == 0
    known = json.loads((tmp_path / "known" / "results.json").read_text())
    assert [r["target"] for r in known["results"]] == targets
    for res in known["results"]:
        assert set(res["kinds"]) == set(suite.KINDS)
        for data in res["kinds"].values():
            assert [p["source"] for p in data["pairs"]] == ["real", *suite.other_generators(res["target"])]
            assert all(0.0 <= p["balanced_accuracy"] <= 1.0 and 0.0 <= p["auc"] <= 1.0 for p in data["pairs"])
    text = doc.read_text()
    assert text.count(known_sources.BEGIN) == 1 and "## Benchmark suite, rerun" in text
    section = text[text.index(known_sources.BEGIN) :]
    assert sum(line.startswith(f"| {t} |") for line in section.splitlines() for t in targets) == len(targets) * 5


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py") if "def main(" in p.read_text()))
def test_every_bench_script_runs_as_a_command(script):
    import subprocess

    done = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage:"), done.stderr[-500:]
