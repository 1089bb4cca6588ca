"""Logging one onboarding run: params, metrics, plots, tables, monitoring reference and the pyfunc model."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import logging
import os
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import mlflow.data
import numpy as np
import pandas as pd
import psutil
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

import flipad
import registry
from flipad.detectors.base import Detector
from flipad.detectors.bundle import save_bundle
from flipad.generators.loading import GeneratorSource
from flipad.scoring import served_columns

from .plots import mean_activation_figure, roc_figure, score_histograms
from .pyfunc import INPUT_COLUMN, to_request_cell
from .redact import redact_params
from .store import experiment_name

__all__ = ["OnboardingRecord", "LoggedRun", "log_run", "experiment_name", "load_reference", "log_monitoring_run", "model_definition", "model_requirements", "onboarding_run", "REFERENCE_ARTIFACT"]

logger = logging.getLogger(__name__)

MODEL_CODE = Path(registry.__file__).parent / "model_code.py"
REFERENCE_ARTIFACT = "monitoring/reference.parquet"
def signature() -> ModelSignature:
    """The served model's signature: base64 items in, the served columns of the row schema out
    (:func:`flipad.scoring.served_columns`)."""
    return ModelSignature(inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
                          outputs=Schema([ColSpec(c.dtype, c.name, required=c.required) for c in served_columns()]))


@dataclass
class OnboardingRecord:
    """Everything one onboarding run logs. ``scores`` are per source, higher = more typical."""

    name: str
    detector: Detector
    source: GeneratorSource
    params: dict[str, Any]
    metrics: dict[str, float]
    results: pd.DataFrame
    scores: dict[str, np.ndarray]
    own_source: str
    mean_activations: dict[str, np.ndarray]
    reference: pd.DataFrame
    input_example: list[bytes]
    tags: dict[str, str] = field(default_factory=dict)
    card: str = ""  # the model card (markdown), logged as model_card.md
    datasets: dict[str, tuple[np.ndarray, str]] = field(default_factory=dict)  # name -> (items, "training"/"evaluation")


@dataclass(frozen=True)
class LoggedRun:
    run_id: str
    experiment_id: str
    model_uri: str
    run_url: str


def model_definition(bundle: Path) -> dict[str, Any]:
    """The pyfunc model of a saved detector bundle, as keyword arguments of
    ``mlflow.pyfunc.log_model``/``save_model``: the model-from-code entry point, the bundle as its
    artifact, the ``flipad`` and ``registry`` packages as its code, its signature and its
    computed pip requirements."""
    return {
        "python_model": str(MODEL_CODE),
        "artifacts": {"bundle": str(bundle)},
        "code_paths": [str(Path(flipad.__file__).parent), str(Path(registry.__file__).parent)],
        "signature": signature(),
        "pip_requirements": model_requirements(),
    }


def model_requirements() -> list[str]:
    """The logged model's pip requirements: every distribution its code (the ``flipad`` and
    ``registry`` packages it carries) imports, at the version installed here (local labels such
    as ``+cpu`` dropped). An import that no installed distribution provides raises."""
    modules: set[str] = set()
    for package in (flipad, registry):
        for path in Path(package.__file__).parent.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    modules |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    providers = importlib.metadata.packages_distributions()
    requirements = set()
    for module in sorted(modules - {"flipad", "registry"} - set(sys.stdlib_module_names)):
        if module not in providers:
            raise RuntimeError(f"the model code imports {module!r}, which no installed distribution provides")
        for dist in providers[module]:
            requirements.add(f"{dist}=={importlib.metadata.version(dist).split('+')[0]}")
    return sorted(requirements)


@contextmanager
def onboarding_run(name: str, tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """The MLflow run of one onboarding, open from its first step: a failure anywhere ends it as
    FAILED with the one-line reason in the tag ``error``. Runs of this machine left RUNNING by a
    killed process (their ``flipad.pid`` is gone) are ended as KILLED first."""
    experiment = mlflow.set_experiment(experiment_name(name))
    _end_orphaned_runs(experiment.experiment_id)
    session = uuid.uuid4().hex
    tags = {**(tags or {}), "flipad.host": socket.gethostname(), "flipad.pid": str(os.getpid()), "flipad.session": session}
    _OPEN_SESSIONS.add(session)
    run = mlflow.start_run(run_name=f"onboard-{name}", tags=tags)
    try:
        yield run
    except BaseException as exc:
        _OPEN_SESSIONS.discard(session)
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
        try:
            mlflow.set_tag("error", reason)
        except Exception:  # the server is gone too; ending the run below fails alike
            pass
        try:
            mlflow.end_run("FAILED")  # leaves no run active in this process even when the server is gone
        except Exception as lost:  # the server is gone: the next onboarding of this name ends it KILLED
            logger.info("could not mark run %s FAILED (%s)", run.info.run_id, str(lost).splitlines()[0][:200])
        raise
    else:
        _OPEN_SESSIONS.discard(session)
        mlflow.end_run()


_OPEN_SESSIONS: set[str] = set()  # onboarding runs this process has open


def _end_orphaned_runs(experiment_id: str) -> None:
    """End as KILLED the RUNNING onboarding runs of this machine whose process is gone, or that this
    process no longer has open (the tracking server was lost before the run could be ended)."""
    client = mlflow.MlflowClient()
    host = socket.gethostname()
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=100):
        tags = run.data.tags
        pid = tags.get("flipad.pid", "")
        if tags.get("flipad.host") != host or not pid.isdigit():
            continue
        gone = not psutil.pid_exists(int(pid))
        abandoned = int(pid) == os.getpid() and tags.get("flipad.session") not in _OPEN_SESSIONS
        if gone or abandoned:
            client.set_terminated(run.info.run_id, "KILLED")


def log_run(record: OnboardingRecord) -> LoggedRun:
    """Log ``record`` into the active run (:func:`onboarding_run`; a new run of the generator's
    experiment when none is active), with the detector as a pyfunc model."""
    experiment = mlflow.set_experiment(experiment_name(record.name))
    threshold = record.detector.threshold()
    active = mlflow.active_run()
    context = nullcontext(active) if active else mlflow.start_run(run_name=f"onboard-{record.name}", tags=record.tags)
    with context as run:
        mlflow.set_tags(record.tags)
        mlflow.log_params({k: (json.dumps(v) if isinstance(v, (dict, list, tuple)) else v)
                           for k, v in redact_params(record.params).items()})
        mlflow.log_metrics(record.metrics)
        own = record.scores[record.own_source]
        others = {k: v for k, v in record.scores.items() if k != record.own_source}
        mlflow.log_figure(roc_figure(own, others, threshold), "plots/roc.png")
        mlflow.log_figure(score_histograms(record.scores, threshold), "plots/score_histograms.png")
        mlflow.log_figure(mean_activation_figure(record.mean_activations), "plots/mean_activation.png")
        mlflow.log_table(record.results, "evaluation/results.json")
        if record.card:
            mlflow.log_text(record.card, "model_card.md")
        for dataset_name, (items, context) in record.datasets.items():  # linked in the UI's Datasets panel
            mlflow.log_input(mlflow.data.from_numpy(items, name=dataset_name), context=context)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            record.results.to_csv(tmp / "results.csv", index=False)
            mlflow.log_artifact(str(tmp / "results.csv"), "evaluation")
            record.reference.to_parquet(tmp / "reference.parquet", index=False)
            mlflow.log_artifact(str(tmp / "reference.parquet"), "monitoring")
            bundle = save_bundle(tmp / "bundle", record.detector, record.source)
            example = pd.DataFrame({INPUT_COLUMN: [to_request_cell(b) for b in record.input_example]})
            info = mlflow.pyfunc.log_model(
                name=record.name,  # the logged model is named after the generator it attributes to
                input_example=example,
                model_config={"name": record.name},  # the served model finds its key sets by it
                **model_definition(bundle),
            )
    uri = mlflow.get_tracking_uri()
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    run_url = f"{base}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
    return LoggedRun(run.info.run_id, experiment.experiment_id, info.model_uri, run_url)


def load_reference(run_id: str, sources: tuple[str, ...] | None = None) -> pd.DataFrame:
    """The monitoring reference logged by onboarding run ``run_id`` (optionally only some sources)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=REFERENCE_ARTIFACT, dst_path=tmp)
        frame = pd.read_parquet(path)
    return frame[frame["source"].isin(sources)].reset_index(drop=True) if sources else frame


def log_monitoring_run(name: str, version: str, onboarding_run_id: str, model_id: str, metrics: dict[str, float],
                       summary: dict, report_html: str, window: str, sentences: list[str] = (),
                       alarms: list[str] = ()) -> str:
    """One monitoring run per attribution execution in ``flipad/NAME/monitoring``; returns its run id.

    The run is linked to what it monitors: the version's logged model as the run's model input
    (MLflow 3), and a description with links to the registered version and its onboarding run,
    each alarm's sentence (``alarms``) and every monitor's (``sentences``).
    """
    from mlflow.entities import LoggedModelInput

    mlflow.set_experiment(f"{experiment_name(name)}/monitoring")
    said = "".join(f"\n- **ALARM**: {s}" for s in alarms) + "".join(f"\n- {s}" for s in sentences if s not in alarms)
    description = (f"Monitoring of the stream scored by [{name} v{version}](#/models/{name}/versions/{version}) "
                   f"({window}) against the reference of its onboarding run `{onboarding_run_id}`: "
                   f"{'**ALARM**' if alarms else 'no alarm'}.{said}\n\nEvidently drift report (for reading): "
                   "`drift/report.html`.")
    tags = {"model": name, "version": version, "flipad.onboarding_run_id": onboarding_run_id,
            "flipad.window": window, "mlflow.note.content": description}
    with mlflow.start_run(run_name=f"attribute-{name}-v{version}", tags=tags) as run:
        if model_id:
            mlflow.MlflowClient().log_inputs(run.info.run_id, models=[LoggedModelInput(model_id)])
        mlflow.log_metrics(metrics)
        mlflow.log_dict(redact_params(summary), "drift/summary.json")
        if report_html:
            mlflow.log_text(report_html, "drift/report.html")
    return run.info.run_id
