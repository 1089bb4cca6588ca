"""Where MLflow data lives: the configured tracking server, or the embedded default (SQLite + folder)."""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException as TrackingError  # what a tracking call raises, for callers outside registry/

logger = logging.getLogger(__name__)

__all__ = ["TrackingError", "TrackingUnavailableError", "connect", "experiment_name", "ui_command", "use_tracking"]


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking location cannot be used; the message says what to do."""


def default_tracking_uri(root: str | Path | None = None) -> str:
    """The embedded default: ``sqlite:///<root>/mlflow.db`` (artifacts in ``<root>/mlruns``), root = cwd."""
    return f"sqlite:///{Path(root or Path.cwd()).resolve() / 'mlflow.db'}"


def connect(timeout_s: float = 5.0) -> str:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` (checked to answer) or at the embedded default; return the URI.

    A server that does not answer raises :class:`TrackingUnavailableError` at once instead of the
    client's minutes of retries.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if not os.environ.get("MLFLOW_TRACKING_URI") and not Path(uri.removeprefix("sqlite:///")).exists():
        logger.warning("no MLflow store at %s yet: creating one (set MLFLOW_TRACKING_URI to use a tracking server, "
                       "or run from the folder that holds your mlflow.db)", uri.removeprefix("sqlite:///"))
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
                healthy = response.status == 200
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingUnavailableError(
                f"MLflow tracking server {uri} is unreachable ({getattr(exc, 'reason', exc)}); start it, "
                "or unset MLFLOW_TRACKING_URI to use the local store"
            ) from exc
        if not healthy:
            raise TrackingUnavailableError(f"MLflow tracking server {uri} answered /health with {response.status}")
    mlflow.set_tracking_uri(uri)
    return uri


def use_tracking(uri: str) -> None:
    """Point this process's MLflow client at ``uri`` (a Dask worker, say, that did not run :func:`connect`)."""
    mlflow.set_tracking_uri(uri)


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on ``uri``'s data."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def experiment_name(name: str) -> str:
    """The MLflow experiment of the registered model ``name``'s onboarding runs (its monitoring and
    key set runs live in sub-experiments ``/monitoring`` and ``/keys``)."""
    return f"flipad/{name}"
