"""The benchmarks: the zoo, one benchmark's quick run rebuilding the doc, and (``-m benchmarks``)
``python -m bench all --quick`` running every benchmark and rebuilding the doc, with the suite's
records at their smoke size (the tables' structure and ranges, not their values)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import flipad.io.perturb as perturb
from bench import common, known_sources, report, suite

ROOT = Path(__file__).resolve().parent.parent


def test_zoo_training_is_reproducible_bit_for_bit(fashion_train, tmp_path):
    size = common.ZOO_SIZES["smoke"]
    first = common.zoo_generator("wgan-gp", 1, size, tmp_path / "a", fashion_train[:256])
    second = common.zoo_generator("wgan-gp", 1, size, tmp_path / "b", fashion_train[:256])
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    record = json.loads((tmp_path / "a" / "wgan-gp-s1.json").read_text())
    assert record["training"]["loss"] == "wgan-gp" and record["seed"] == 1
    reloaded = common.zoo_generator("wgan-gp", 1, size, tmp_path / "a", None)  # from the cache, no data needed
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), reloaded.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="train the zoo first"):
        common.zoo_generator("ebgan", 0, size, tmp_path / "c", None)


def test_perturbations_keep_shape_and_change_pixels():
    images = np.random.default_rng(0).integers(0, 256, (3, 1, 32, 32), dtype=np.uint8)
    for name in perturb.PERTURBATIONS:
        out = perturb.perturb(images, name)
        assert out.shape == images.shape and out.dtype == np.uint8, name
        assert not np.array_equal(out, images), name


def test_the_doc_shows_a_full_run_before_a_quick_one(tmp_path):
    doc = tmp_path / "docs" / "benchmarks.md"
    for quick, finding in ((True, "a quick finding"), (False, "a full finding")):
        path = report.result_path(doc, "stream_faults", quick)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"name": "stream_faults", "date": "2026-12-05", "quick": quick, "seconds": 1.0,
                                    "command": "python -m bench stream_faults", "machine": "test", "options": [],
                                    "figures": {"findings": [finding]}}))
        report.write_doc(doc)
        assert f"- {finding}" in doc.read_text()
    text = doc.read_text()
    assert "a quick finding" not in text and "at full size" in text
    assert all(f"## {name}: " in text for name in report.BENCHMARKS)
    assert text.count("Not run yet") == len(report.BENCHMARKS) - 1


def test_one_benchmark_runs_quick_and_its_record_rebuilds_the_doc(tmp_path):
    """What every benchmark shares, in the default suite: ``python -m bench NAME --quick`` writes its
    record beside the doc and rebuilds the doc from it (every benchmark: ``-m benchmarks`` below)."""
    doc = tmp_path / "docs" / "benchmarks.md"
    done = subprocess.run([sys.executable, "-m", "bench", "inversion_speed", "--quick", "--doc", str(doc)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    record = json.loads(report.result_path(doc, "inversion_speed", quick=True).read_text())
    assert record["quick"] and record["figures"] and record["seconds"] > 0
    text = doc.read_text()
    assert "`python -m bench inversion_speed --quick`" in text
    assert text.count("Not run yet") == len(report.BENCHMARKS) - 1


@pytest.mark.benchmarks
def test_every_benchmark_runs_quick_and_rebuilds_the_doc(tmp_path):
    listed = subprocess.run([sys.executable, "-m", "bench", "--list"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0 and [line.split()[0] for line in listed.stdout.splitlines()] == list(report.BENCHMARKS)
    doc = tmp_path / "docs" / "benchmarks.md"
    done = subprocess.run([sys.executable, "-m", "bench", "all", "--quick", "--doc", str(doc)], cwd=ROOT,
                          capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    text = doc.read_text()
    for name in report.BENCHMARKS:
        record = json.loads(report.result_path(doc, name, quick=True).read_text())
        assert record["quick"] and record["figures"], name
        assert f"## {name}: " in text and f"`python -m bench {name} --quick`" in text, name
    assert "Not run yet" not in text
    headline = text[text.index("## Today's headline figures") : text.index(f"## {report.BENCHMARKS[0]}: ")]
    assert "\n- " not in headline  # quick figures are no headline
    assert all(f"`python -m bench {name}`" in headline for name in report.BENCHMARKS)  # named as not yet run
    for name in report.BENCHMARKS:  # each benchmark's headline lines are built from its record
        assert report.summary(name) == report.load(name).doc.strip().splitlines()[0]  # what --list shows
        assert isinstance(report.load(name).headline(json.loads(report.result_path(doc, name, True).read_text())
                                                     ["figures"]), list)
    _check_suite(json.loads(report.result_path(doc, "suite", quick=True).read_text())["figures"],
                 json.loads(report.result_path(doc, "known_sources", quick=True).read_text())["figures"])


def _check_suite(results: dict, known: dict) -> None:
    """The suite's and the known-sources setting's records at smoke size: structure and ranges."""
    targets = [r["target"] for r in results["results"]]
    assert targets == [common.generator_name(f, 0) for f in common.FAMILIES]
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
    for split, count in suite.zoo_split_sizes(smoke).items():
        assert len(list((ROOT / ".flipad" / "zoo" / "smoke" / "samples" / "lsgan-s1" / split).glob("*.png"))) >= count
    for plot in ("roc.png", "robustness.png", "convergence.png"):
        assert (ROOT / results["plots"] / plot).stat().st_size > 0
    table = [line for line in suite.render(results).splitlines() if line.startswith("| ") and " | " in line]
    assert sum(line.startswith(f"| {t} |") for line in table for t in targets) == len(targets) * 5

    assert [r["target"] for r in known["results"]] == targets
    for res in known["results"]:
        assert set(res["kinds"]) == set(suite.KINDS)
        for data in res["kinds"].values():
            assert [p["source"] for p in data["pairs"]] == ["real", *suite.other_generators(res["target"])]
            assert all(0.0 <= p["balanced_accuracy"] <= 1.0 and 0.0 <= p["auc"] <= 1.0 for p in data["pairs"])
    section = known_sources.render(known)
    assert sum(line.startswith(f"| {t} |") for line in section.splitlines() for t in targets) == len(targets) * 5
