"""attribute_stream against a real S3 endpoint (moto's server mode), MLflow server and Prefect harness."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pytest
from helpers import small_config
from mlflow.tracking import MlflowClient
from moto.server import ThreadedMotoServer
from PIL import Image
from servers import free_port, prefect_server

from flipad.io.data import encode_item
from flows.attribute import AttributeConfig, attribute_stream
from flows.onboard import OWN, onboard_generator
from flows.storage import Results, StorageError
from monitoring.drift import check_drift, mix_matched
from registry.pyfunc import FlipadModel
from registry.runs import load_reference
from registry.versions import load_model, logged_model_id

ROOT = Path(__file__).resolve().parent.parent

MODEL = "stream-gen"


@pytest.fixture(scope="module")
def s3(monkeypatch_module):
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch_module.setenv(key, value)
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    yield endpoint, client
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def registered(tracking, user_generator, real_folder):
    spec, weights = user_generator
    return onboard_generator(small_config(spec, weights, real_folder, name=MODEL))


def jpeg(image: np.ndarray, quality: int = 30) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[0]).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.mark.slow
def test_s3_stream_is_scored_exactly_once_and_resumes(registered, s3, fashion_test, monkeypatch):
    endpoint, client = s3
    client.create_bucket(Bucket="content")
    client.create_bucket(Bucket="results")
    own = registered.detector.adapter.generate(500, seed=77)
    items = {f"in/own/{i:04d}.png": encode_item(x) for i, x in enumerate(own)}
    items |= {f"in/real/{i:04d}.png": encode_item(x) for i, x in enumerate(fashion_test[260:760])}
    items |= {f"in/bad/corrupt{i}.png": encode_item(own[i])[:50] for i in range(3)}
    items |= {"in/bad/notes.txt": b"not an image", "in/bad/table.csv": b"a,b\n1,2\n"}
    items |= {f"in/bad/small{i}.png": encode_item(np.zeros((1, 28, 28), np.uint8)) for i in range(2)}
    for key, body in items.items():
        client.put_object(Bucket="content", Key=key, Body=body)
    assert len(items) > 1000  # more than one page of list_objects_v2
    config = AttributeConfig(models=(MODEL,), input="s3://content/in/", output="s3://results/run/", batch_size=200,
                             endpoint_url=endpoint)

    # a run that dies after three batches keeps what it committed and nothing else
    calls = [0]
    original = FlipadModel.score_bytes

    def failing(self, payload, *keysets):
        calls[0] += 1
        if calls[0] > 3:
            raise RuntimeError("injected failure")
        return original(self, payload, *keysets)

    monkeypatch.setattr(FlipadModel, "score_bytes", failing)
    with pytest.raises(RuntimeError, match="batches failed"):
        attribute_stream(config)
    monkeypatch.setattr(FlipadModel, "score_bytes", original)
    partial = pd.read_parquet(io.BytesIO(client.get_object(Bucket="results", Key="run/results.parquet")["Body"].read()))
    assert 0 < len(partial) < len(items) and not partial.duplicated(["uri", "model", "version"]).any()

    # the next run resumes: every item exactly once, bad items as error rows
    resumed = attribute_stream(config)
    rows = resumed.rows
    assert resumed.new_rows == len(items) - len(partial)
    assert len(rows) == len(items) and not rows.duplicated(["uri", "model", "version"]).any()
    assert set(rows["uri"]) == {f"s3://content/{k}" for k in items}
    bad = rows[rows["uri"].str.contains("/bad/")]
    assert len(bad) == 7 and (bad["error"] != "").all() and bad["score"].isna().all()
    assert bad[bad["uri"].str.contains("small")]["error"].str.contains("shape").all()
    good = rows[~rows["uri"].str.contains("/bad/")]
    assert (good["error"] == "").all() and set(good["version"].astype(str)) == {registered.version}
    own_rows, real_rows = good[good["uri"].str.contains("/own/")], good[good["uri"].str.contains("/real/")]
    accuracy = (own_rows["is_generated"].astype(bool).sum() + (~real_rows["is_generated"].astype(bool)).sum()) / len(good)
    assert accuracy >= 0.9, accuracy
    assert resumed.reports[MODEL].startswith("s3://results/run/drift-")
    # the drift report covers the failed run's committed rows too, and its run is linked to the version
    assert resumed.drift[MODEL]["n_current"] == len(good)
    tracking = MlflowClient()
    experiment = tracking.get_experiment_by_name(f"flipad/{MODEL}/monitoring")
    (found,) = tracking.search_runs([experiment.experiment_id])
    monitoring = tracking.get_run(found.info.run_id)  # search results carry no model inputs
    version = tracking.get_model_version(MODEL, registered.version)
    assert [m.model_id for m in monitoring.inputs.model_inputs] == [logged_model_id(version)] != [""]
    assert monitoring.data.tags["flipad.onboarding_run_id"] == registered.run_id
    assert f"#/models/{MODEL}/versions/{registered.version}" in monitoring.data.tags["mlflow.note.content"]
    named = {k for k in monitoring.data.metrics if k.startswith("drift_score_")}
    assert named in ({"drift_score_p_value"}, {"drift_score_distance"}), monitoring.data.metrics

    # nothing new: nothing written, nothing monitored again; an overwritten object is scored again
    unchanged = attribute_stream(config)
    assert unchanged.new_rows == 0 and unchanged.drift == {}
    client.put_object(Bucket="content", Key="in/own/0000.png", Body=encode_item(own[-1]))
    again = attribute_stream(config)
    assert again.new_rows == 1
    etag = client.head_object(Bucket="content", Key="in/own/0000.png")["ETag"].strip('"')
    assert etag in set(again.rows[again.rows["uri"] == "s3://content/in/own/0000.png"]["etag"])


def test_unreachable_store_fails_cleanly(registered, tmp_path):
    config = AttributeConfig(models=(MODEL,), input="s3://content/in/", output=str(tmp_path / "out.csv"),
                             endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError, match="listing s3://content/in/ failed"):
        attribute_stream(config)
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "out.csv.parts").exists()


@pytest.mark.slow
def test_dask_cluster_gives_the_same_rows(registered, tracking, tmp_path, fashion_test):
    stream = tmp_path / "stream"
    stream.mkdir()
    own = registered.detector.adapter.generate(30, seed=5)
    for i, x in enumerate([*own, *fashion_test[800:830]]):
        (stream / f"{i:03d}.png").write_bytes(encode_item(x))
    (stream / "broken.png").write_bytes(b"garbage")
    local = attribute_stream(AttributeConfig(models=(MODEL,), input=str(stream), output=str(tmp_path / "local.csv"),
                                             batch_size=16, monitor=False))
    # Dask worker processes need a real Prefect API (the harness lives in this process only)
    with prefect_server(tmp_path) as api:
        env = {**os.environ, "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": tracking}
        run = subprocess.run(
            [sys.executable, "-m", "flows.cli", "attribute", "--model", MODEL, "--input", str(stream), "--output",
             str(tmp_path / "dask.csv"), "--batch-size", "16", "--workers", "2", "--no-monitor"],
            env=env, capture_output=True, text=True, timeout=400,
        )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "batch 4/4 committed; 61/61 items settled" in run.stderr  # progress, one line per batch
    dask = pd.read_csv(tmp_path / "dask.csv", keep_default_na=False, dtype={"version": str})
    key = ["uri", "model", "version"]
    merged = local.rows.merge(dask, on=key, suffixes=("", "_dask"))
    assert len(merged) == len(local.rows) == 61
    scored = merged[merged["error"] == ""]
    np.testing.assert_allclose(scored["score"].astype(float), scored["score_dask"].astype(float), rtol=1e-5)
    assert (merged["error"] == merged["error_dask"]).all()


def test_mix_matched_reference_has_the_streams_attributed_share():
    reference = pd.DataFrame({"is_generated": [True] * 100 + [False] * 100, "score": np.arange(200.0)})
    current = pd.DataFrame({"is_generated": ["True"] * 10 + ["False"] * 90})  # as read back from a CSV
    matched = mix_matched(reference, current)
    assert len(matched) == 111 and matched["is_generated"].sum() == 11  # all 100 rejected rows, 11 attributed
    assert matched.equals(mix_matched(reference, current))
    assert mix_matched(reference, current.iloc[:10])["is_generated"].all()


@pytest.mark.slow
def test_monitoring_flags_shifted_streams_only(registered, fashion_test):
    python_model, version = load_model(MODEL, registered.version)
    reference = load_reference(registered.run_id, sources=(OWN, "real"))
    own = registered.detector.adapter.generate(60, seed=4242)
    real = fashion_test[900:960]

    def rows(payloads: list[bytes]) -> pd.DataFrame:
        return pd.DataFrame([r.as_row() for r in python_model.score_bytes(payloads)])

    fresh = check_drift(reference, rows([encode_item(x) for x in [*own, *real]]))
    assert not fresh.drifted, fresh.summary()
    # another mix of the same sources is not trouble: compared at the stream's attributed share
    mostly_real = check_drift(reference, rows([encode_item(x) for x in [*own[:6], *real]]))
    assert not mostly_real.drifted and mostly_real.attributed_fraction < 0.2, mostly_real.summary()
    shifted = check_drift(reference, rows([jpeg(x) for x in [*own, *real]]))
    assert shifted.drifted, shifted.summary()
    page = shifted.html(f"flipad drift: {MODEL} v1")
    assert "<html" in page.lower() and f"<title>flipad drift: {MODEL} v1</title>" in page


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (docs/screenshots.py)")
def test_reviewer_pages_render_in_headless_chromium(registered, tracking, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "screenshots.py"), "--tracking-uri", tracking,
                           "--model", MODEL, "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    shots = sorted(p.name for p in tmp_path.glob("*.png"))
    assert shots == ["model-version.png", "onboarding-run.png", "registered-model.png", "roc.png", "score-histograms.png"]
    for path in tmp_path.glob("*.png"):
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"), dtype=float)
        assert image.size[0] == 1400 and pixels.std() > 10, path  # a rendered page, not a blank one


def test_s3_lease_excludes_a_second_run_and_expires_when_its_holder_died(s3):
    endpoint, client = s3
    client.create_bucket(Bucket="leases")
    first, second = Results("s3://leases/out/", endpoint), Results("s3://leases/out/", endpoint)
    entered = threading.Event()

    def wait_for_the_lease() -> None:
        with second.lease(timeout_s=60):
            entered.set()

    with first.lease():
        waiter = threading.Thread(target=wait_for_the_lease)
        waiter.start()
        assert not entered.wait(2.5)  # held by the first run
        with pytest.raises(StorageError, match="another run holds s3://leases/out/"):
            with Results("s3://leases/out/", endpoint).lease(timeout_s=0):
                pass
    assert entered.wait(10)  # released: the waiting run gets it
    waiter.join()
    assert "Contents" not in client.list_objects_v2(Bucket="leases", Prefix="out/.lease")

    # a killed run's lease blocks until it expires, then is taken over; a live holder renews its own
    client.put_object(Bucket="leases", Key="out/.lease", Body=json.dumps({"owner": "dead", "expires": time.time() - 1}))
    with first.lease(timeout_s=0, ttl_s=0.9):
        time.sleep(1.5)
        held = json.loads(client.get_object(Bucket="leases", Key="out/.lease")["Body"].read())
        assert held["owner"] != "dead" and held["expires"] > time.time()
