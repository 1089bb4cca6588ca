"""``flipad stack``: the production topology on one machine, from PyPI pieces, without containers.

The same services as ``deploy/compose.yaml``, on 127.0.0.1 by default:

- an S3-compatible object store (moto's server mode) with the buckets ``flipad-mlflow``
  (MLflow artifacts), ``flipad-content`` (incoming content) and ``flipad-results``;
- an MLflow tracking server (SQLite backend in the stack folder, artifacts proxied to S3);
- a Prefect server (SQLite in the stack folder), the work pools ``flipad-cpu`` and ``flipad-gpu``
  with one process worker each, and the deployments of ``deploy/prefect.yaml``.

State (PIDs with start times, URLs) is kept in ``<dir>/stack.json``; the environment a client
needs is written to ``<dir>/stack.env`` (mode 0600: it holds the object store's credentials).
``down`` stops exactly the processes the state file names, workers before their server.
Note that moto keeps objects in memory: the buckets' contents are gone after ``down``, while the
MLflow and Prefect databases stay in the stack folder (their artifact links then dangle).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import boto3

from flipad.io.files import atomic_write

from .processes import Handle, alive, log_tail, port_in_use, spawn, stop, wait_http

__all__ = ["StackError", "StackPorts", "ServiceStatus", "up", "down", "status", "read_env", "BUCKETS", "POOLS",
           "project_root", "DEFAULT_DIR"]

DEFAULT_DIR = Path(".flipad/stack")
BUCKETS = {"mlflow": "flipad-mlflow", "content": "flipad-content", "results": "flipad-results"}
POOLS = ("flipad-cpu", "flipad-gpu")
STATE_FILE = "stack.json"
ENV_FILE = "stack.env"
BIN = Path(sys.executable).parent


class StackError(RuntimeError):
    """The stack cannot be started, used or stopped; the message says what to do."""


@dataclass(frozen=True)
class StackPorts:
    s3: int = 9000
    mlflow: int = 5000
    prefect: int = 4200


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int
    up: bool
    url: str | None
    log: str


def project_root() -> Path:
    """The checkout holding ``deploy/prefect.yaml`` and the flows' source (``FLIPAD_HOME`` or this package's parent)."""
    root = Path(os.environ.get("FLIPAD_HOME") or Path(__file__).resolve().parent.parent)
    if not (root / "deploy" / "prefect.yaml").is_file():
        raise StackError(f"{root} holds no deploy/prefect.yaml; set FLIPAD_HOME to a flipad checkout")
    return root


def _tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        hint = " (pip install 'flipad[stack]')" if name == "moto_server" else ""
        raise StackError(f"'{name}' is not installed{hint}")
    return found


def _state_path(directory: Path) -> Path:
    return directory / STATE_FILE


def _read_state(directory: Path) -> dict | None:
    path = _state_path(directory)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StackError(f"{path} is unreadable ({exc}); stop leftover processes by hand and delete it") from exc


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, atomically."""
    atomic_write(path, text.encode(), mode=0o600)


def _handles(state: dict) -> list[Handle]:
    return [Handle(**s["handle"]) for s in state["services"]]


def read_env(directory: Path = DEFAULT_DIR) -> dict[str, str]:
    """The client environment of a running stack (what ``stack.env`` exports)."""
    state = _read_state(Path(directory))
    if state is None:
        raise StackError(f"no stack in {directory}; run 'flipad stack up'")
    return dict(state["env"])


def _client_env(host: str, ports: StackPorts, root: Path) -> dict[str, str]:
    s3 = f"http://{host}:{ports.s3}"
    return {
        "MLFLOW_TRACKING_URI": f"http://{host}:{ports.mlflow}",
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "AWS_ENDPOINT_URL": s3,
        "AWS_ACCESS_KEY_ID": "flipad" + secrets.token_hex(6),
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(24),
        "AWS_DEFAULT_REGION": "us-east-1",
        "PREFECT_API_URL": f"http://{host}:{ports.prefect}/api",
        "FLIPAD_HOME": str(root),
    }


def _quiet_env() -> dict[str, str]:
    return {"MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONUNBUFFERED": "1"}


def up(directory: Path = DEFAULT_DIR, host: str = "127.0.0.1", ports: StackPorts = StackPorts(),
       deploy: bool = True, timeout: float = 120.0) -> dict[str, str]:
    """Start the stack (or confirm it runs) and return the client environment.

    Anything started before a failure is stopped again, so a failed ``up`` leaves nothing behind.
    """
    directory = Path(directory).resolve()
    state = _read_state(directory)
    if state is not None:
        handles = _handles(state)
        if all(alive(h) for h in handles):
            return dict(state["env"])
        down(directory)  # a partly dead stack is restarted whole
    root = project_root()
    busy = [f"{name} {port}" for name, port in vars(ports).items() if port_in_use(host, port)]
    if busy:
        raise StackError(f"ports in use on {host}: {', '.join(busy)}; stop what uses them or pick others "
                         "(--s3-port, --mlflow-port, --prefect-port)")
    directory.mkdir(parents=True, exist_ok=True)
    env = _client_env(host, ports, root)
    base = {**os.environ, **_quiet_env(), **env}
    logs = directory / "logs"
    started: list[Handle] = []
    services: list[dict] = []

    def record(handle: Handle, url: str | None) -> None:
        started.append(handle)
        services.append({"handle": handle.to_dict(), "url": url})
        _write_private(_state_path(directory), json.dumps({"services": services, "env": env}, indent=1))

    try:
        s3 = spawn("s3", [_tool("moto_server"), "-H", host, "-p", str(ports.s3)], logs / "s3.log", base)
        record(s3, env["AWS_ENDPOINT_URL"])
        wait_http(f"{env['AWS_ENDPOINT_URL']}/moto-api/", timeout, s3)
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        for bucket in BUCKETS.values():
            client.create_bucket(Bucket=bucket)

        mlflow = spawn("mlflow", [
            _tool("mlflow"), "server", "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
            "--artifacts-destination", f"s3://{BUCKETS['mlflow']}/artifacts", "--host", host,
            "--port", str(ports.mlflow), "--workers", "1"], logs / "mlflow.log", base)
        record(mlflow, env["MLFLOW_TRACKING_URI"])
        prefect_env = {**base, "PREFECT_HOME": str(directory / "prefect-home")}
        prefect = spawn("prefect-server", [_tool("prefect"), "server", "start", "--host", host,
                                           "--port", str(ports.prefect)], logs / "prefect-server.log",
                        {k: v for k, v in prefect_env.items() if k != "PREFECT_API_URL"})
        record(prefect, env["PREFECT_API_URL"].removesuffix("/api"))
        wait_http(f"{env['MLFLOW_TRACKING_URI']}/health", timeout, mlflow)
        wait_http(f"{env['PREFECT_API_URL']}/health", timeout, prefect)

        _create_pools(prefect_env)
        if deploy:
            _deploy(root, prefect_env, logs / "deploy.log")
        for pool in POOLS:
            worker = spawn(f"worker-{pool}", [_tool("prefect"), "worker", "start", "--pool", pool, "--type", "process"],
                           logs / f"worker-{pool}.log", prefect_env, cwd=root)
            record(worker, None)
        _wait_workers(prefect_env, started, timeout)
    except BaseException as exc:
        for handle in reversed(started):
            stop(handle, signal.SIGINT if handle.name.startswith("worker") else signal.SIGTERM)
        _state_path(directory).unlink(missing_ok=True)
        if isinstance(exc, (StackError, KeyboardInterrupt)):
            raise
        raise StackError(f"the stack did not start ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                         f"logs in {logs}") from exc
    _write_private(directory / ENV_FILE, "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
    return env


def _create_pools(env: dict[str, str]) -> None:
    for pool in POOLS:
        _run([_tool("prefect"), "work-pool", "create", pool, "--type", "process", "--overwrite"], env)


def _deploy(root: Path, env: dict[str, str], log: Path) -> None:
    """Register the deployments of ``deploy/prefect.yaml`` (the same command a cluster operator runs)."""
    out = _run([_tool("prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", str(root / "deploy" / "prefect.yaml")],
               env, cwd=root)
    log.write_text(out)


def _run(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> str:
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-1500:]
        raise StackError(f"'{' '.join(cmd[1:4])} ...' failed with exit code {done.returncode}:\n{tail}")
    return done.stdout + done.stderr


def _wait_workers(env: dict[str, str], handles: list[Handle], timeout: float) -> None:
    """Wait until every pool has a worker polling it (its status turns READY)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import WorkPoolStatus
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + timeout
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        waiting = list(POOLS)
        while waiting:
            for handle in handles:
                if handle.name.startswith("worker") and not alive(handle):
                    raise StackError(f"{handle.name} exited; log {handle.log}:\n{log_tail(handle)}")
            waiting = [p for p in waiting if client.read_work_pool(p).status != WorkPoolStatus.READY]
            if waiting and time.monotonic() > deadline:
                raise StackError(f"no worker became ready for {', '.join(waiting)} within {timeout:.0f} s")
            if waiting:
                time.sleep(0.5)


def down(directory: Path = DEFAULT_DIR) -> list[str]:
    """Stop every process the stack started (workers first); return the names of those that were running."""
    directory = Path(directory).resolve()
    state = _read_state(directory)
    if state is None:
        return []
    stopped = []
    # workers first: once their server is gone they ignore SIGTERM
    for handle in sorted(_handles(state), key=lambda h: not h.name.startswith("worker")):
        if stop(handle, signal.SIGINT if handle.name.startswith("worker") else signal.SIGTERM):
            stopped.append(handle.name)
    _state_path(directory).unlink(missing_ok=True)
    (directory / ENV_FILE).unlink(missing_ok=True)
    return stopped


def status(directory: Path = DEFAULT_DIR) -> list[ServiceStatus]:
    """What the stack in ``directory`` started, and whether each piece still runs."""
    state = _read_state(Path(directory).resolve())
    if state is None:
        return []
    return [ServiceStatus(h.name, h.pid, alive(h), s["url"], h.log) for h, s in zip(_handles(state), state["services"])]
