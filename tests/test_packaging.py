"""Packaging and the command line's edges: ranges with a tested lock, a core-only install, the
model's computed requirements, --version and the checks made before Prefect starts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

from registry.runs import model_requirements

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_dependencies_are_ranges_with_the_tested_versions_in_constraints():
    core = " ".join(PROJECT["dependencies"])
    assert not re.search(r"\b(mlflow|prefect|evidently|boto3|typer)\b", core)  # the core installs alone
    mlops = PROJECT["optional-dependencies"]["mlops"]
    assert mlops and not any("==" in r for r in mlops)
    pinned = {line.split("==")[0].lower() for line in (ROOT / "constraints.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    for requirement in mlops + PROJECT["dependencies"]:
        assert re.split(r"[<>=!\[ ]", requirement)[0].lower() in pinned, requirement
    assert (ROOT / "LICENSE").read_text().startswith("MIT License") and PROJECT["license"] == "MIT"


def test_model_requirements_come_from_what_the_model_code_imports():
    requirements = model_requirements()
    names = {r.split("==")[0] for r in requirements}
    assert {"torch", "numpy", "tqdm", "pillow", "safetensors", "mlflow", "pandas"} <= names
    assert not names & {"prefect", "evidently", "boto3", "typer"}  # flows/ and monitoring/ are not model code
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements and all("+" not in r for r in requirements)


def _flipad(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_version_and_fast_one_line_errors(tmp_path):
    version = _flipad("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("flipad ")
    missing = _flipad("onboard", "x", "--generator", "dcgan", "--real", str(tmp_path / "nope"), cwd=tmp_path)
    lines = missing.stderr.strip().splitlines()
    assert missing.returncode == 1 and lines[-1] == f"error: --real {tmp_path / 'nope'} does not exist", missing.stderr
    assert len(lines) == 1  # checked before torch, MLflow or Prefect is imported
    if not torch.cuda.is_available():
        cuda = _flipad("onboard", "x", "--generator", "dcgan", "--real", str(tmp_path), "--device", "cuda",
                                cwd=tmp_path)
        assert cuda.returncode == 1 and "--device cuda" in cuda.stderr.strip().splitlines()[-1]
    unknown = _flipad("onboard", "x", "--generator", "dcgan", "--real", str(tmp_path), "--detector", "nosuch",
                         cwd=tmp_path)
    assert unknown.returncode == 1 and "--detector: unknown detector kind 'nosuch'" in unknown.stderr, unknown.stderr
    assert not (tmp_path / "mlflow.db").exists()  # every check ran before a store was touched


@pytest.mark.parametrize("bad", ["--promote=sometimes", "--device=tpu"])
def test_choices_are_checked_by_the_command_line(bad, tmp_path):
    done = _flipad("onboard", "x", "--generator", "dcgan", "--real", str(tmp_path), bad, cwd=tmp_path)
    assert done.returncode == 2 and "Invalid value" in done.stderr


def test_cache_prune_deletes_old_stage_results_only(tmp_path):
    folder = tmp_path / "prefect-home" / "storage" / "flipad-stages"
    folder.mkdir(parents=True)
    (folder / "old").write_bytes(b"x" * 1000)
    (folder / "new").write_bytes(b"y")
    os.utime(folder / "old", (time.time() - 8 * 86400,) * 2)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_RESULTS_LOCAL_STORAGE_PATH", None)
    done = subprocess.run([sys.executable, "-m", "flows.cli", "cache", "prune"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0 and f"removed 1 cached stage results (0.0 MiB) from {folder}; 1 kept" in done.stdout
    assert [p.name for p in folder.iterdir()] == ["new"]
