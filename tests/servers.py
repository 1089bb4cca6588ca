"""Real local servers for tests: an MLflow tracking server and a Prefect server, on 127.0.0.1, stopped by PID."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

from flows.processes import free_port, log_tail, spawn, stop, wait_http

__all__ = ["BIN", "free_port", "process", "mlflow_server", "prefect_server"]

BIN = Path(sys.executable).parent


@contextmanager
def process(cmd: list[str], health: str, timeout: float, log: Path, env: dict | None = None):
    """A server subprocess for the duration of a test: healthy on entry, stopped by PID on exit."""
    handle = spawn(log.stem, cmd, log, {**os.environ, **(env or {})})
    try:
        try:
            wait_http(health, timeout, handle)
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}; log tail:\n{log_tail(handle, 3000)}") from exc
        yield handle
    finally:
        stop(handle)


@contextmanager
def mlflow_server(root: Path):
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with process(cmd, f"http://127.0.0.1:{port}/health", 90, root / "mlflow.log", env):
        yield f"http://127.0.0.1:{port}"


@contextmanager
def prefect_server(root: Path):
    port = free_port()
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    env = {"PREFECT_HOME": str(root / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": ""}
    with process(cmd, f"http://127.0.0.1:{port}/api/health", 90, root / "prefect.log", env):
        yield f"http://127.0.0.1:{port}/api"
