"""A detector family defined outside the package, in this file, works end to end without editing
any file of the repository: onboarded by ``flipad onboard --detector ... --set ...``, attributed
by ``flipad attribute`` (its diagnostic a column of the rows, watched by monitoring), served as
the pyfunc model, and its bundle reloaded to score identically.

The toy family: the distance of an item to the generator's mean output, calibrated like every
family on held-out samples of the generator. Its stage (the distances) runs as the flow's cached
Prefect task; it declares one setting that changes its result, so ``--set`` is seen to reach it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from flipad import (
    Detector,
    DetectorSettings,
    GeneratorSource,
    Scores,
    Seeds,
    Stages,
    load_bundle,
    register_kind,
    save_bundle,
)
from flipad.detectors.base import INLINE
from flipad.detectors.calibration import check_fnr
from flipad.detectors.persist import check_generator, read_saved, write_saved
from flipad.generators import weights_fingerprint
from flipad.generators.sampling import generate_samples, probe_output_range, resolve_latent_shape
from flipad.io.data import encode_item, to_output_range
from flows.cli import app

MODEL = "toy-mean-distance"


@dataclass(frozen=True)
class MeanDistanceSettings:
    n_mean: int = field(default=300, metadata={"help": "generator samples the mean output is taken over"})
    power: float = field(default=2.0, metadata={"help": "the exponent of the per-pixel distance"})


class MeanDistance:
    """The family's stage: per item, the mean of |x - mean output|^power."""

    name = "mean-distance"
    device = "cpu"

    def __init__(self, mean: torch.Tensor, power: float, output_range: tuple[float, float], offset: float = 0.0):
        self.mean, self.power, self.output_range, self.offset = mean, power, output_range, offset

    def fingerprint(self) -> str:
        parts = repr((self.power, self.output_range, self.offset)).encode()
        return hashlib.sha256(self.mean.numpy().tobytes() + parts).hexdigest()

    def run(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = to_output_range(samples, *self.output_range).double()
        return (x - self.mean - self.offset).abs().pow(self.power).flatten(1).mean(1)


@register_kind
class MeanDistanceDetector(Detector):
    kind = "mean-distance"
    description = "distance to the generator's mean output (a toy family defined in a test)"
    Settings = MeanDistanceSettings
    diagnostics = {"mean_distance": "mean |x - the generator's mean output|^power"}

    def __init__(self, module: nn.Module, latent_shape: Sequence[int] | None = None, fnr: Sequence[float] = (0.005,),
                 n_validation: int = 1000, n_mean: int = 300, power: float = 2.0, seed: int = 0):
        self._module, self.latent_shape, self.fnr = module.eval(), latent_shape, check_fnr(fnr)
        self.n_validation, self.n_mean, self.power, self.seed = n_validation, n_mean, power, seed
        self.latent_shape_ = resolve_latent_shape(module, latent_shape)
        self.range_ = probe_output_range(module, self.latent_shape_)

    @classmethod
    def from_settings(cls, module: nn.Module, latent_shape: Sequence[int] | None,
                      settings: DetectorSettings) -> MeanDistanceDetector:
        own = settings.of(cls)
        return cls(module, latent_shape, settings.fnr, settings.n_validation, own.n_mean, own.power, settings.seed)

    def generate(self, n: int, seed: int) -> np.ndarray:
        return generate_samples(self._module, self.latent_shape_, n, seed, self.range_)

    def fit(self, generated=None, real=None, negatives=None, validation=None, stages: Stages = INLINE):
        seeds = Seeds(self.seed)
        mean = to_output_range(self.generate(self.n_mean, seeds.train), *self.range_).double().mean(0)
        self.stage_ = MeanDistance(mean, self.power, self.range_, self._offset())
        if validation is None:
            validation = self.generate(self.n_validation, seeds.validation)
        self._calibrate(stages.run(self.stage_, validation, "generated (validation)"))
        return self

    def _offset(self) -> float:
        return 0.0

    def _anomaly(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        self._offset()
        return self.stage_.run(samples)

    def score(self, samples: np.ndarray | torch.Tensor, stages: Stages = INLINE, exhaustive: bool = False) -> Scores:
        self._check_fitted()
        self._offset()
        distance = stages.run(self.stage_, samples, "score")
        return self._verdict_scores(distance, {"mean_distance": distance.numpy()})

    @property
    def module(self) -> nn.Module:
        return self._module

    @property
    def output_shape(self) -> tuple[int, ...]:
        return tuple(self.stage_.mean.shape)

    @property
    def sample_range(self) -> tuple[float, float]:
        return self.range_

    def generator_info(self) -> dict[str, Any]:
        return {"latent_shape": list(self.latent_shape_)}

    def save(self, path: str | Path) -> Path:
        config = {"generator_sha256": weights_fingerprint(self._module), "latent_shape": list(self.latent_shape_),
                  "fnr": list(self.fnr), "n_validation": self.n_validation, "n_mean": self.n_mean, "power": self.power,
                  "seed": self.seed}
        return write_saved(path, self.kind, config, {"mean": self.stage_.mean, "validation": self.validation_scores_})

    @classmethod
    def load(cls, path: str | Path, module: nn.Module, device: str = "auto",
             latent_shape: Sequence[int] | None = None) -> MeanDistanceDetector:
        config, tensors = read_saved(path, cls.kind)
        check_generator(path, config["generator_sha256"], weights_fingerprint(module))
        det = cls(module, config["latent_shape"], config["fnr"], config["n_validation"], config["n_mean"],
                  config["power"], config["seed"])
        det.stage_ = MeanDistance(tensors["mean"], det.power, det.range_)
        det._calibrate(tensors["validation"])
        return det


@register_kind
class KeyedMeanDistanceDetector(MeanDistanceDetector):
    """The toy family with a secret: the distance is taken to the mean output shifted by an offset
    derived from the owner's master secret, so without the secret it cannot score."""

    kind = "keyed-mean-distance"
    description = "distance to the generator's mean output shifted by a secret offset (a toy family in a test)"
    secret = "derives the offset the distance is taken from"

    def use_secret(self, secret: bytes) -> None:
        digest = hmac.new(secret, b"keyed-mean-distance", hashlib.sha256).digest()
        self.key_offset_ = 0.5 * int.from_bytes(digest[:4], "big") / 2**32
        if hasattr(self, "stage_"):
            self.stage_.offset = self.key_offset_

    def _offset(self) -> float:
        if not hasattr(self, "key_offset_"):
            raise ValueError(f"the {self.kind} detector needs the owner's secret")
        return self.key_offset_


@pytest.mark.slow
def test_a_family_defined_here_onboards_attributes_serves_and_reloads(tracking, user_generator, real_folder, tmp_path,
                                                                      monkeypatch):
    import flows.onboard
    from registry.versions import load_detector

    ran: list[str] = []  # the family's stage runs as the flow's Prefect task
    original = flows.onboard.run_stage.fn
    monkeypatch.setattr(flows.onboard.run_stage, "fn", lambda stage, samples, label: ran.append(stage.name) or
                        original(stage, samples, label))

    spec, weights = user_generator
    runner = CliRunner()
    families = runner.invoke(app, ["families"])
    assert "--set mean-distance.power=2.0" in families.output and "column mean_distance" in families.output

    bad = runner.invoke(app, ["onboard", MODEL, "--generator", spec, "--weights", str(weights), "--latent-shape", "64",
                              "--real", str(real_folder), "--detector", "mean-distance", "--set", "mean-distance.pwr=1"])
    assert bad.exit_code == 1 and "mean-distance.pwr: unknown setting" in bad.output.strip().splitlines()[-1], bad.output

    onboarded = runner.invoke(app, [
        "onboard", MODEL, "--generator", spec, "--weights", str(weights), "--latent-shape", "64", "--real",
        str(real_folder), "--detector", "mean-distance", "--set", "mean-distance.power=1", "--set",
        "mean-distance.n_mean=200", "--num-samples", "150", "--num-validation", "200", "--num-test", "60",
        "--challenger-steps", "0"])
    assert onboarded.exit_code == 0, onboarded.output
    assert f"registered {MODEL} version 1" in onboarded.output
    assert ran and set(ran) == {"mean-distance"}
    detector, _ = load_detector(MODEL)
    assert isinstance(detector, MeanDistanceDetector) and detector.power == 1.0 and detector.n_mean == 200
    run = mlflow.get_run(mlflow.MlflowClient().get_model_version(MODEL, "1").run_id)
    assert run.data.params["settings.mean-distance.power"] == "1.0"
    assert run.data.tags["detector_kind"] == "mean-distance"

    own = detector.generate(30, seed=Seeds().test + 99)
    noise = np.random.default_rng(0).integers(0, 256, (30, *own.shape[1:]), dtype=np.uint8)
    stream = tmp_path / "stream"
    stream.mkdir()
    for i, item in enumerate([*own, *noise]):
        (stream / f"{'own' if i < 30 else 'noise'}-{i:03d}.png").write_bytes(encode_item(item))
    out = tmp_path / "rows.csv"
    attributed = runner.invoke(app, ["attribute", "--model", MODEL, "--input", str(stream), "--output", str(out)])
    assert attributed.exit_code == 0, attributed.output
    rows = pd.read_csv(out).sort_values("uri")
    assert "mean_distance" in rows.columns and rows["mean_distance"].notna().all()
    is_own = rows["uri"].str.contains("/own-")
    assert rows.loc[is_own, "verdict"].eq("attributed").mean() >= 0.9
    assert rows.loc[~is_own, "verdict"].eq("not attributed").all()
    np.testing.assert_allclose(rows["score"], -rows["mean_distance"], rtol=1e-6)  # its score is its negated distance
    monitoring = mlflow.search_runs(experiment_names=[f"flipad/{MODEL}/monitoring"])
    assert len(monitoring) == 1 and any(c.startswith("metrics.drift_mean_distance_") for c in monitoring.columns)

    served = mlflow.pyfunc.load_model(f"models:/{MODEL}/1")
    cells = [base64.b64encode(encode_item(x)).decode() for x in own[:5]]
    answer = served.predict(pd.DataFrame({"image": cells}))
    np.testing.assert_allclose(answer["score"], detector.score_samples(own[:5]), rtol=1e-6)
    assert (answer["verdict"] == np.where(detector.predict(own[:5]), "attributed", "not attributed")).all()

    bundle = save_bundle(tmp_path / "bundle", detector, GeneratorSource(spec, {}, (64,)))
    reloaded = load_bundle(bundle, device="cpu")
    assert isinstance(reloaded, MeanDistanceDetector)
    np.testing.assert_array_equal(reloaded.score(noise).score, detector.score(noise).score)
    assert reloaded.thresholds == detector.thresholds

    # a fresh process knows the kind from the bundle, and the command line from package.module:kind
    check = ("import sys, numpy as np; from flipad import load_bundle; from flipad.kinds import detector_class; "
             "loaded = type(load_bundle(sys.argv[1])).__name__; "
             "print(loaded, detector_class('test_extension:mean-distance').kind)")
    fresh = subprocess.run([sys.executable, "-c", check, str(bundle)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert fresh.stdout.split() == ["MeanDistanceDetector", "mean-distance"], fresh.stderr[-2000:]



@pytest.mark.slow
def test_a_family_with_a_secret_gets_it_from_the_owner_and_never_records_it(tracking, user_generator, real_folder,
                                                                             tmp_path):
    from registry.versions import load_detector

    spec, weights = user_generator
    secret = os.urandom(32)
    secret_file = tmp_path / "master.key"
    secret_file.write_bytes(secret)
    secret_file.chmod(0o600)
    runner = CliRunner()
    assert "secret: derives the offset" in runner.invoke(app, ["families"]).output
    args = ["onboard", "keyed-toy", "--generator", spec, "--weights", str(weights), "--latent-shape", "64", "--real",
            str(real_folder), "--detector", "keyed-mean-distance", "--num-samples", "150", "--num-validation", "200",
            "--num-test", "60", "--challenger-steps", "0"]
    refused = runner.invoke(app, args, env={"FLIPAD_KEY_SECRET_FILE": ""})
    assert refused.exit_code == 1 and "needs the owner's secret" in refused.output.strip().splitlines()[-1]
    onboarded = runner.invoke(app, [*args, "--secret-file", str(secret_file)])
    assert onboarded.exit_code == 0, onboarded.output

    stream = tmp_path / "stream"
    stream.mkdir()
    detector, _ = load_detector("keyed-toy")  # served without the secret: it cannot score
    with pytest.raises(ValueError, match="needs the owner's secret"):
        detector.score_samples(np.zeros((1, 1, 32, 32), np.uint8))
    detector.use_secret(secret)
    own = detector.generate(10, seed=Seeds().test + 5)
    for i, item in enumerate(own):
        (stream / f"{i:03d}.png").write_bytes(encode_item(item))
    out = tmp_path / "rows.csv"
    without = runner.invoke(app, ["attribute", "--model", "keyed-toy", "--input", str(stream), "--output", str(out)],
                            env={"FLIPAD_KEY_SECRET_FILE": ""})
    assert without.exit_code == 1 and "needs the owner's secret" in without.output.strip().splitlines()[-1]
    scored = runner.invoke(app, ["attribute", "--model", "keyed-toy", "--input", str(stream), "--output", str(out),
                                 "--secret-file", str(secret_file)])
    assert scored.exit_code == 0, scored.output
    rows = pd.read_csv(out)
    assert rows["error"].isna().all() and rows["verdict"].eq("attributed").mean() >= 0.9
    np.testing.assert_allclose(np.sort(rows["score"]), np.sort(detector.score_samples(own)), rtol=1e-6)

    client = mlflow.MlflowClient()
    run = client.get_run(client.get_model_version("keyed-toy", "1").run_id)
    recorded = [*run.data.params.values(), *run.data.tags.values()]
    assert not any(secret.hex() in str(v) or repr(secret) in str(v) for v in recorded)
    for uri in (run.info.artifact_uri, "models:/keyed-toy/1"):  # the run's artifacts and the model's bundle
        files = [f for f in Path(mlflow.artifacts.download_artifacts(uri)).rglob("*") if f.is_file()]
        assert files and not any(secret in f.read_bytes() or secret.hex().encode() in f.read_bytes() for f in files)
