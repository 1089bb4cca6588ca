"""Packaging and the command line's edges: ranges with a tested lock, a core-only install, the
model's computed requirements, --version and the checks made before Prefect starts."""

from __future__ import annotations

import json
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


@pytest.mark.slow
def test_installs_beside_other_releases_of_mlflow_and_prefect(tmp_path):
    """pip resolves flipad[mlops] together with the other releases (no downgrade, no conflict)."""
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                           "--report", str(report), "-c", str(ROOT / "tests" / "data" / "other-stack-versions.txt"),
                           "torch==2.13.0", f"{ROOT}[mlops]"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    chosen = {item["metadata"]["name"].lower(): item["metadata"]["version"]
              for item in json.loads(report.read_text())["install"]}
    assert (chosen["mlflow"], chosen["prefect"]) == ("3.17.0", "3.9.1")
    assert chosen["torch"].split("+")[0] == "2.13.0"


@pytest.mark.slow
def test_logged_model_code_imports_in_a_fresh_venv_from_its_requirements(tmp_path):
    """A fresh venv gets torch, then only the model's logged requirements.txt, and serves the model."""
    import mlflow

    from registry.runs import model_definition

    model = tmp_path / "model"
    mlflow.pyfunc.save_model(str(model), **model_definition(ROOT / "tests" / "data" / "legacy-flipad"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    for args in (["torch==2.13.0"], ["-r", str(model / "requirements.txt")]):
        pip = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-compile", *args],
                             capture_output=True, text=True, timeout=1200)
        assert pip.returncode == 0, pip.stderr[-3000:]
    probe = ROOT / "tests" / "data" / "legacy_probe.npy"
    script = ("import base64, io, numpy as np, pandas as pd, mlflow\n"
              "from PIL import Image\n"
              f"image = np.load({str(probe)!r})[0]\n"
              "buffer = io.BytesIO(); Image.fromarray(image[0]).save(buffer, 'PNG')\n"
              "cells = [base64.b64encode(b).decode() for b in (buffer.getvalue(), b'not an image')]\n"
              f"model = mlflow.pyfunc.load_model({str(model)!r})\n"
              "print(model.predict(pd.DataFrame({'image': cells})).to_json(orient='records'))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "VIRTUAL_ENV"))}
    served = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env=env)
    assert served.returncode == 0, served.stderr[-3000:]
    rows = json.loads(served.stdout.strip().splitlines()[-1])
    assert rows[0]["error"] == "" and rows[0]["score"] is not None and rows[1]["error"]


def test_unknown_model_is_reported_before_prefect_starts(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([sys.executable, "-m", "flows.cli", "attribute", "--model", "nosuch", "--input", str(tmp_path),
                           "--output", str(tmp_path / "r.csv")], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and lines == ["error: no registered detector nosuch@champion (Registered Model with "
                                              "name=nosuch not found); run 'flipad models' to see what exists"], lines
    assert not (tmp_path / "prefect-home" / "prefect.db").exists()  # no temporary Prefect server was started
