"""Onboarding against a real MLflow tracking server and Prefect's test harness."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request

import mlflow
import numpy as np
import pandas as pd
import pytest
from helpers import small_config
from mlflow.tracking import MlflowClient
from servers import BIN, free_port, process
from typer.testing import CliRunner

from flipad.io.data import encode_item
from flipad.detectors.evaluation import evaluate_scores
from flows.cli import app
from flows.onboard import TEST_SEED_OFFSET, onboard_generator
from registry.pyfunc import to_request_cell
from registry.versions import load_detector, register_version
from flows.stage_cache import stage_cache_dir

SEED = 7


def count_inversions(monkeypatch) -> list[int]:
    """Items the flow's feature task computes (MLflow's input-example check at log time is not counted)."""
    import flows.onboard

    calls = [0]
    task = flows.onboard.run_stage
    original = task.fn

    def counting(stage, samples, label):
        if stage.name == "compute-features":
            calls[0] += len(samples)
        return original(stage, samples, label)

    monkeypatch.setattr(task, "fn", counting)
    return calls


@pytest.mark.slow
def test_onboarding_registers_logs_promotes_and_caches(tracking, user_generator, real_folder, monkeypatch):
    spec, weights = user_generator
    # seed 7: other tests onboard this generator with seed 0, and the feature cache spans names
    first = onboard_generator(small_config(spec, weights, real_folder, seed=SEED))
    client = MlflowClient()
    assert (first.version, first.alias) == ("1", "champion")
    assert first.cached_feature_sets == 0

    # the logged metrics are what the held-out data gives, recomputed from the registered model
    detector, version = load_detector("tiny-gen", "@champion")
    assert version == "1"
    own = detector.adapter.generate(60, seed=TEST_SEED_OFFSET + SEED)
    real_test = _real_test_split(real_folder, detector)
    fnr = detector.fnr[0]
    (pair,) = evaluate_scores({fnr: detector.threshold(fnr)}, detector.score_samples(own),
                              {"real": detector.score_samples(real_test)})
    logged = client.get_run(first.run_id).data.metrics
    assert logged["balanced_accuracy_real_fnr0.05"] == pytest.approx(pair.balanced_accuracy)
    assert logged["auc_real"] == pytest.approx(pair.auc)
    assert 0 <= logged["heldout_fnr_fnr0.05"] <= logged["heldout_fnr_upper95_fnr0.05"] <= 1
    artifacts = {a.path for folder in ("plots", "evaluation", "monitoring") for a in client.list_artifacts(first.run_id, folder)}
    assert {"plots/roc.png", "plots/score_histograms.png", "plots/mean_activation.png", "evaluation/results.csv",
            "monitoring/reference.parquet"} <= artifacts
    mv = client.get_model_version("tiny-gen", "1")
    assert mv.tags["generator_sha256"] == detector.adapter.fingerprint and mv.tags["git_commit"]

    # the pyfunc loaded by alias scores exactly like the in-process detector
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-gen@champion")
    cells = [to_request_cell(encode_item(x)) for x in own[:8]] + [to_request_cell(b"not an image")]
    out = pyfunc.predict(pd.DataFrame({"image": cells}))
    np.testing.assert_allclose(out["score"][:8].to_numpy(float), first.detector.score_samples(own[:8]), rtol=1e-4, atol=1e-6)
    assert out["error"][8] and out["error"][:8].eq("").all()
    assert (out["is_generated"][:8] == (out["score"][:8] >= out["threshold"][:8])).all()

    # a rerun with unchanged inputs reuses every cached inversion and is promoted by the policy
    calls = count_inversions(monkeypatch)
    second = onboard_generator(small_config(spec, weights, real_folder, seed=SEED))
    assert calls[0] == 0 and second.cached_feature_sets == 5
    assert len(list(stage_cache_dir().iterdir())) >= 5  # in flipad's own folder, which 'flipad cache prune' empties
    assert second.version == "2" and second.alias == "champion"  # as good as v1 on the same held-out data
    third = onboard_generator(small_config(spec, weights, real_folder, seed=SEED, promote="never"))
    aliases = client.get_registered_model("tiny-gen").aliases
    assert third.alias == "challenger" and aliases == {"champion": "2", "challenger": "3"}

    # the same generator registered under another name is reported as the same generator
    copy = register_version("tiny-gen-copy", mv.source, 1.0, lambda champion: 0.0, tags=dict(mv.tags))
    assert {"tiny-gen v1", "tiny-gen v2", "tiny-gen v3"} <= set(copy.same_generator)
    copied = client.get_model_version("tiny-gen-copy", copy.version)
    assert "tiny-gen v1" in copied.tags["same_generator_as"] and "## Same generator" in copied.description


def _real_test_split(real_folder, detector):
    from flows.onboard import load_split

    return load_split.fn(str(real_folder), detector.adapter.output_shape, 150, 60, SEED)[1]


@pytest.mark.slow
def test_cli_onboard_serve_and_errors(tracking, user_generator, real_folder, tmp_path):
    spec, weights = user_generator
    runner = CliRunner()
    args = ["onboard", "served-gen", "--generator", spec, "--weights", str(weights.with_suffix(".pt")),
            "--latent-shape", "64", "--real", str(real_folder), "--num-samples", "120", "--num-validation", "80",
            "--num-test", "40", "--set", "flipad.epochs=3", "--detector", "flipad"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "registered served-gen version 1 as champion" in result.output
    listing = runner.invoke(app, ["models", "served-gen"])
    assert listing.exit_code == 0 and "champion" in listing.output

    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/served-gen@champion", "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port)]
    path = {"PATH": f"{BIN}:{os.environ.get('PATH', '')}"}  # mlflow execs uvicorn from the venv
    with process(cmd, f"http://127.0.0.1:{port}/ping", 180, tmp_path / "serve.log", path):
        detector, _ = load_detector("served-gen")
        images = detector.adapter.generate(3, seed=5)
        cells = [to_request_cell(encode_item(x)) for x in images] + ["%%% not base64"]
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[c] for c in cells]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            rows = json.loads(response.read())["predictions"]
    assert len(rows) == 4 and set(rows[0]) == {"score", "threshold", "is_generated", "verdict", "reason", "error", "key_id",
                                               "key_bits_correct", "key_p_value"}
    assert [r["verdict"] for r in rows] == ["attributed"] * 3 + ["error"] and rows[0]["key_id"] == ""
    np.testing.assert_allclose([r["score"] for r in rows[:3]], detector.score_samples(images), rtol=1e-4, atol=1e-6)
    assert rows[3]["error"].startswith("not a decodable")
    assert rows[3]["score"] is None or np.isnan(rows[3]["score"])

    # bad inputs: one-line error, non-zero exit, no version registered
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.png").write_bytes(encode_item(np.zeros((1, 32, 32), np.uint8)))
    (mixed / "b.png").write_bytes(encode_item(np.zeros((1, 28, 28), np.uint8)))
    bad = {
        "bad spec": ["--generator", "no_such_module.sub:factory", "--real", str(real_folder)],
        "missing weights": ["--generator", spec, "--weights", str(tmp_path / "missing.pt"), "--real", str(real_folder)],
        "mismatched sizes": ["--generator", spec, "--weights", str(weights), "--real", str(mixed)],
    }
    for case, extra in bad.items():
        result = runner.invoke(app, ["onboard", "broken-gen", "--latent-shape", "64", *extra])
        assert result.exit_code == 1, (case, result.output)
        *progress, last = result.output.strip().splitlines()
        # one error line, last; before it only the progress lines of the stages that ran (no traceback)
        assert last.startswith("error: ") and all(re.search(r": (started|done|failed)\b", line) for line in progress), \
            (case, result.output)
    unreachable = subprocess.run(
        [sys.executable, "-m", "flows.cli", "onboard", "broken-gen", "--generator", spec, "--weights", str(weights),
         "--latent-shape", "64", "--real", str(real_folder)],
        env={**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"},
        capture_output=True, text=True, timeout=300,
    )
    assert unreachable.returncode == 1 and "unreachable" in unreachable.stderr.strip().splitlines()[-1]
    assert not MlflowClient().search_registered_models(filter_string="name='broken-gen'")


@pytest.mark.slow
def test_combined_detector_is_onboarded_registered_and_served(tracking, user_generator, real_folder):
    from flipad import AttributionDetector, FlipadDetector

    spec, weights = user_generator
    # a FLIPAD champion exists first: promoting the combined version re-scores it on the same held-out sets
    flipad_only = onboard_generator(small_config(spec, weights, real_folder, name="tiny-combined", seed=3))
    combined = onboard_generator(small_config(spec, weights, real_folder, name="tiny-combined", seed=3,
                                              detector="combined", promote="always",
                                              family_settings={"flipad": {"epochs": 4}, "reconstruction": {
                                                  "method": "adam", "steps": 100, "starts": 2}}))
    assert isinstance(flipad_only.detector, FlipadDetector) and isinstance(combined.detector, AttributionDetector)
    assert (combined.version, combined.alias) == ("2", "champion")
    metrics = MlflowClient().get_run(combined.run_id).data.metrics
    for prefix in ("", "flipad.", "reconstruction."):
        assert 0.0 <= metrics[f"{prefix}primary_balanced_accuracy"] <= 1.0
        assert 0.0 <= metrics[f"{prefix}heldout_fnr_fnr0.05"] <= 1.0
    assert metrics["primary_balanced_accuracy"] >= 0.9, metrics  # the verdict vs real images
    assert metrics["time_combined_calibration_s"] > 0
    # the FLIPAD family of the combined run is the FLIPAD-only run's detector (same seed, same cached features)
    assert metrics["flipad.primary_balanced_accuracy"] == pytest.approx(flipad_only.metrics["primary_balanced_accuracy"])
    assert MlflowClient().get_model_version("tiny-combined", "2").tags["detector_kind"] == "attribution"

    served, version = load_detector("tiny-combined")
    assert version == "2" and isinstance(served, AttributionDetector) and served.fit_info_["families"] == ["flipad", "reconstruction"]
    own = combined.detector.reconstruction_.generate(6, seed=TEST_SEED_OFFSET + 3)
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-combined@champion")
    out = pyfunc.predict(pd.DataFrame({"image": [to_request_cell(encode_item(x)) for x in own]}))
    np.testing.assert_allclose(out["score"].to_numpy(float), combined.detector.score_samples(own), rtol=1e-4, atol=1e-6)
