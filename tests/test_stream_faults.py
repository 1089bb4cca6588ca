"""Nothing stops, corrupts or fools a stream: poison items, symlinks, the output inside the input,
overlapping runs and a killed run (real MLflow server, Prefect harness, real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import small_config
from servers import BIN

from flipad.io.data import encode_item
from flows.attribute import AttributeConfig, attribute_stream
from flows.onboard import onboard_generator

from bench.odd_items import odd_valid_items, poison_items

MODEL = "faults-gen"


@pytest.fixture(scope="module")
def registered(tracking, user_generator, real_folder):
    spec, weights = user_generator
    return onboard_generator(small_config(spec, weights, real_folder, name=MODEL, seed=11))


@pytest.mark.slow
def test_poison_symlinks_and_self_output_never_stop_or_fool_the_stream(registered, tmp_path):
    own = registered.detector.generate(6, seed=91)
    folder = tmp_path / "in"
    (folder / "ok").mkdir(parents=True)
    for i, image in enumerate(own):
        (folder / "ok" / f"{i}.png").write_bytes(encode_item(image))
    (folder / "bad").mkdir()
    poison = poison_items()
    for name, data in poison.items():
        (folder / "bad" / name).write_bytes(data)
    # valid images under odd names and formats are scored
    odd = odd_valid_items(own)
    for name, data in odd.items():
        (folder / "ok" / name).write_bytes(data)
    outside = tmp_path / "outside.png"
    outside.write_bytes(encode_item(own[4]))
    os.symlink("/etc/passwd", folder / "passwd.png")
    os.symlink(outside, folder / "outside-link.png")
    os.symlink(tmp_path, folder / "loop")
    output = folder / "results.csv"  # the output lives inside the input folder

    config = AttributeConfig(models=(MODEL,), input=str(folder), output=str(output), batch_size=5, monitor=False)
    result = attribute_stream(config)
    rows = result.rows
    regular = len(own) + len(poison) + len(odd)
    assert len(rows) == regular and rows["uri"].is_unique, rows["uri"].tolist()
    assert not rows["uri"].str.contains("passwd|outside|loop|results.csv").any()
    bad = rows[rows["uri"].str.contains("/bad/")]
    assert len(bad) == len(poison) and (bad["error"] != "").all() and not bad["is_generated"].fillna(False).astype(bool).any()
    for name in ("nan.npy", "all-nan.npy", "inf.npy", "1e30.npy"):
        assert bad[bad["uri"].str.endswith(name)]["score"].isna().all()
    good = rows[rows["uri"].str.contains("/ok/")]
    assert (good["error"] == "").all(), good[["uri", "error"]]
    assert good["uri"].str.contains(r"\\xff\\xfe").any()  # the undecodable name, escaped in the row
    # the next run reads nothing of its own output back: the count settles
    again = attribute_stream(config)
    assert again.new_rows == 0 and len(again.rows) == regular


@pytest.mark.slow
def test_overlapping_runs_on_one_output_write_no_duplicates(registered, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    images = registered.detector.generate(60, seed=92)
    for i in range(30):
        (folder / f"{i:03d}.png").write_bytes(encode_item(images[i]))
    config = AttributeConfig(models=(MODEL,), input=str(folder), output=str(tmp_path / "out.parquet"), batch_size=5,
                             monitor=False)
    errors: list[Exception] = []

    def run() -> None:
        try:
            attribute_stream(config)
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    def arrive() -> None:
        for i in range(30, 60):
            (folder / f"{i:03d}.png").write_bytes(encode_item(images[i]))
            time.sleep(0.05)

    threads = [threading.Thread(target=run), threading.Thread(target=arrive), threading.Thread(target=run)]
    for t in threads:
        t.start()
        time.sleep(0.5)
    for t in threads:
        t.join()
    assert not errors, errors
    rows = attribute_stream(config).rows  # picks up whatever arrived after both listings
    assert len(rows) == 60 and not rows.duplicated(["uri", "model", "version"]).any()


@pytest.mark.slow
def test_a_killed_run_keeps_the_batches_it_committed(registered, tracking, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, image in enumerate(registered.detector.generate(80, seed=93)):
        (folder / f"{i:03d}.png").write_bytes(encode_item(image))
    output = tmp_path / "out.csv"
    parts = tmp_path / "out.csv.parts"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    cmd = [str(BIN / "flipad"), "attribute", "--model", MODEL, "--input", str(folder), "--output", str(output),
           "--batch-size", "4", "--no-monitor"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(parts.glob("part-*.parquet"))) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = pd.concat([pd.read_parquet(p) for p in parts.glob("part-*.parquet")])
    assert 3 * 4 <= len(kept) < 80
    resumed = attribute_stream(AttributeConfig(models=(MODEL,), input=str(folder), output=str(output), batch_size=4))
    assert resumed.new_rows == 80 - len(kept)
    assert resumed.drift[MODEL]["n_current"] == 80  # the killed run's rows get their drift report too
    assert len(resumed.rows) == 80 and resumed.rows["uri"].is_unique
    assert not list(tmp_path.glob(".out.csv*.tmp")) and not list(parts.glob(".*.tmp"))
