"""The local production stack: real servers and workers on 127.0.0.1, flows run by workers, stopped by PID."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess

import boto3
import pandas as pd
import psutil
import pytest
from mlflow import MlflowClient
from servers import BIN, free_port

from flipad.generators.adapter import GeneratorAdapter
from flipad.io.data import encode_item
from flipad.generators.loading import GeneratorSource
from flows.stack import BUCKETS, STATE_FILE, StackError, StackPorts, read_env, up

NAME = "stack-gen"


def flipad(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The installed ``flipad`` command in a fresh process, as a user runs it."""
    return subprocess.run([str(BIN / "flipad"), *args], env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def tree(pids: list[int]) -> set[psutil.Process]:
    procs = set()
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            procs |= {proc, *proc.children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
    return procs


@pytest.mark.slow
def test_stack_onboard_and_attribute_through_workers(tmp_path, user_generator, real_folder, fashion_test):
    directory = tmp_path / "stack"
    ports = [free_port() for _ in range(3)]
    clean = {k: "" for k in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME")}
    started = flipad("stack", "up", "--dir", str(directory), "--s3-port", str(ports[0]), "--mlflow-port", str(ports[1]),
                     "--prefect-port", str(ports[2]), env=clean, timeout=300)
    pids = []
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        env = read_env(directory)
        pids = [s["handle"]["pid"] for s in json.loads((directory / STATE_FILE).read_text())["services"]]
        processes = tree(pids)
        assert len(pids) == 5 and all(p.is_running() for p in processes)
        # security defaults: loopback only, credentials readable by the owner only
        listening = {c.laddr.ip for p in processes for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        assert listening == {"127.0.0.1"}
        assert stat.S_IMODE((directory / "stack.env").stat().st_mode) == 0o600
        status = flipad("stack", "status", "--dir", str(directory))
        assert status.returncode == 0 and status.stdout.count(" up ") == 5, status.stdout

        # onboarding through the deployment, executed by the GPU pool's worker (on CPU here); the
        # infrastructure is under test, so the quick FLIPAD detector without the open-world evaluation
        spec, weights = user_generator
        onboarded = flipad("onboard", NAME, "--generator", spec, "--weights", str(weights), "--latent-shape", "64",
                           "--real", str(real_folder), "--num-samples", "120", "--num-validation", "80",
                           "--num-test", "40", "--set", "flipad.epochs=3", "--detector", "flipad", "--no-open-world",
                           "--deployment", "onboard-generator/onboard-generator",
                           env=env)
        assert onboarded.returncode == 0, onboarded.stdout + onboarded.stderr
        assert "completed on a worker" in onboarded.stdout and "champion" in onboarded.stdout

        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        version = client.get_model_version_by_alias(NAME, "champion")
        assert str(version.version) == "1"
        run = client.get_run(version.run_id)
        assert env["AWS_SECRET_ACCESS_KEY"] not in str(run.data.params) + str(run.data.tags)
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])

        def keys(bucket: str, prefix: str = "") -> list[str]:
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            return [o["Key"] for page in pages for o in page.get("Contents", [])]

        artifacts = keys(BUCKETS["mlflow"])
        assert any(version.run_id in k and k.endswith("plots/roc.png") for k in artifacts)
        assert any(k.endswith("/MLmodel") for k in artifacts)

        # a scheduled-style attribution run over the content bucket, executed by the CPU pool's worker
        module = GeneratorSource(spec, {}, (64,)).load(weights)
        own = GeneratorAdapter.from_module(module, latent_shape=(64,), device="cpu").generate(15, seed=77)
        for i, image in enumerate(own):
            s3.put_object(Bucket=BUCKETS["content"], Key=f"incoming/own/{i}.png", Body=encode_item(image))
        for i, image in enumerate(fashion_test[-15:]):
            s3.put_object(Bucket=BUCKETS["content"], Key=f"incoming/real/{i}.png", Body=encode_item(image))
        s3.put_object(Bucket=BUCKETS["content"], Key="incoming/broken.png", Body=b"not an image")
        output = f"s3://{BUCKETS['results']}/{NAME}/"
        attributed = flipad("attribute", "--model", NAME, "--input", f"s3://{BUCKETS['content']}/incoming/",
                            "--output", output, "--deployment", "attribute-stream/attribute-stream-hourly", env=env)
        assert attributed.returncode == 0, attributed.stdout + attributed.stderr

        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterName,
        )
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as prefect:
            deployment = prefect.read_deployment_by_name("attribute-stream/attribute-stream-hourly")
            assert [s.schedule.cron for s in deployment.schedules] == ["0 * * * *"]
            runs = prefect.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["onboard-generator", "attribute-stream-hourly"])))
            done = [r for r in runs if r.state and r.state.is_completed()]
            assert {r.work_pool_name for r in done} == {"flipad-cpu", "flipad-gpu"}
            # run in a worker's subprocess, not in this process
            assert all(r.infrastructure_pid and int(r.infrastructure_pid.rsplit(":", 1)[-1]) != os.getpid() for r in done)

        result_keys = keys(BUCKETS["results"], f"{NAME}/")
        assert f"{NAME}/results.parquet" in result_keys and any("/parts/" in k for k in result_keys)
        assert any(k.rsplit("/", 1)[1].startswith("drift-") for k in result_keys)
        rows = pd.read_parquet(io.BytesIO(s3.get_object(Bucket=BUCKETS["results"], Key=f"{NAME}/results.parquet")["Body"].read()))
        assert len(rows) == 31 and rows["uri"].is_unique
        assert rows.loc[rows["uri"].str.endswith("broken.png"), "error"].iloc[0] != ""
        own_rows = rows[rows["uri"].str.contains("/own/")]
        assert own_rows["is_generated"].mean() >= 0.8
    finally:
        processes = tree(pids)
        stopped = flipad("stack", "down", "--dir", str(directory))
    assert stopped.returncode == 0, stopped.stderr
    _, alive = psutil.wait_procs(list(processes), timeout=10)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not (directory / STATE_FILE).exists() and not (directory / "stack.env").exists()
    assert flipad("stack", "status", "--dir", str(directory)).returncode == 1


def test_stack_up_on_a_busy_port_fails_and_leaves_nothing(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = StackPorts(s3=free_port(), mlflow=busy.getsockname()[1], prefect=free_port())
        with pytest.raises(StackError, match="ports in use"):
            up(tmp_path / "stack", ports=ports)
    assert not (tmp_path / "stack" / STATE_FILE).exists()
    result = flipad("stack", "down", "--dir", str(tmp_path / "stack"))
    assert result.returncode == 0 and "nothing was running" in result.stdout


def test_deployment_runs_and_attribution_fail_in_one_line_without_their_servers(tmp_path):
    no_prefect = flipad("attribute", "--model", "m", "--input", str(tmp_path), "--output", str(tmp_path / "r.csv"),
                        "--deployment", "attribute-stream/attribute-stream-hourly",
                        env={"PREFECT_API_URL": "", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert no_prefect.returncode == 1 and no_prefect.stderr.startswith("error: --deployment needs a Prefect server")
    no_mlflow = flipad("attribute", "--model", "m", "--input", str(tmp_path), "--output", str(tmp_path / "r.csv"),
                       env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"})
    assert no_mlflow.returncode == 1 and "unreachable" in no_mlflow.stderr and len(no_mlflow.stderr.splitlines()) == 1
