"""Run a flow through its Prefect deployment: a worker executes it, this process waits for the outcome."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel

__all__ = ["DeploymentRunError", "absolute_generator", "absolute_location", "run_through_deployment"]


class DeploymentRunError(RuntimeError):
    """The deployment is unknown, or its flow run did not complete; the message says what to do."""


def absolute_location(value: str) -> str:
    """A local path made absolute (the worker's working directory is not ours); URLs unchanged."""
    return value if "://" in value else str(Path(value).resolve())


def absolute_generator(spec: str) -> str:
    """``path/to/file.py:factory`` and ``SCHEME:FOLDER`` (``diffusers:path``) with absolute paths; built-in
    names and ``package.module:factory`` unchanged."""
    from flipad.generators.loading import split_scheme

    head, sep, tail = spec.partition(":")
    if split_scheme(spec) is not None:
        return f"{head}:{Path(tail).resolve()}"
    return f"{Path(head).resolve()}:{tail}" if sep and head.endswith(".py") else spec


def run_through_deployment(deployment: str, config: BaseModel, poll_s: float = 2.0):
    """Create a run of ``deployment`` ("flow-name/deployment-name") with ``config`` and wait for its end.

    Returns the finished ``FlowRun``; raises :class:`DeploymentRunError` unless it completed.
    """
    if not os.environ.get("PREFECT_API_URL"):
        raise DeploymentRunError("--deployment needs a Prefect server: set PREFECT_API_URL "
                                 "(for the local stack: source .flipad/stack/stack.env)")
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        run = run_deployment(deployment, parameters={"config": config.model_dump(mode="json")},
                             timeout=None, poll_interval=poll_s)
    except ObjectNotFound as exc:
        raise DeploymentRunError(f"deployment {deployment!r} is not registered; 'prefect deployment ls' lists them "
                                 "('flipad stack up' registers deploy/prefect.yaml)") from exc
    state = run.state
    if state is None or not state.is_completed():
        name = state.name if state else "unknown"
        raise DeploymentRunError(f"flow run {run.name} ({run.id}) ended {name}: {(state.message or '') if state else ''}; "
                                 f"see 'prefect flow-run logs {run.id}'")
    return run
