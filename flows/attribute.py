"""``attribute_stream``: score new content (a folder or an S3 prefix) with registered detectors.

Exactly-once effect: an item is identified by its URI and content version (S3 ETag), a batch's
rows are committed atomically as one part file, and the parts themselves are the record of what
was processed, so a rerun skips committed items, a killed run resumes at the first uncommitted
batch, and an overwritten object (new ETag) is scored again. Items that fail get an error row;
a store that stays down fails the run before anything half-written becomes visible.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import urllib.request
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field

from flipad.scoring import ItemResult, item_columns
from flipad.keys import KeySet
from monitoring.drift import DRIFT_SHARE, check_drift, metric_name
from monitoring.monitors import MonitorResult, run_monitors
from registry.keysets import keysets, public_keysets
from registry.redact import redact_url
from registry.runs import load_reference, log_monitoring_run
from registry.store import connect, use_tracking
from registry.versions import (
    ResolvedVersion,
    load_model,
    parse_model_ref,
    resolve_version,
)

from .onboard import OWN
from .secrets import master_secret
from .storage import ObjectRef, concat_rows, open_results, open_source

__all__ = ["AttributeConfig", "AttributeResult", "attribute_stream", "result_columns"]

# one line per settled batch (the command line shows it on stderr; see flows/cli.py)
progress = logging.getLogger("flipad.progress")


def result_columns() -> list[str]:
    """One row per (item, detector version): the item, the detector, what the detector said
    (:func:`~flipad.scoring.item_columns`, with every registered kind's diagnostics), when."""
    return ["uri", "model", "version", *item_columns(), "etag", "scored_at"]


class AttributeConfig(BaseModel):
    """Parameters of one attribution run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    models: tuple[str, ...] = Field(min_length=1, description="NAME, NAME@ALIAS or NAME/VERSION (default alias champion)")
    input: str = Field(description="a folder or s3://bucket/prefix")
    output: str = Field(description="results .csv/.parquet file, or an s3://bucket/prefix")
    batch_size: int = Field(256, ge=1, le=10_000)
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, ...); default AWS or AWS_ENDPOINT_URL")
    max_item_bytes: int = Field(32 * 2**20, ge=1)
    in_flight: int = Field(2, ge=1, description="batches submitted at once (memory grows with it)")
    monitor: bool = True
    drift_share: float = Field(DRIFT_SHARE, gt=0, le=1, description="Evidently report: share of columns that make it say drift")
    webhook: str | None = Field(None, description="URL that receives a JSON POST when a monitor alarms")
    secret_file: str | None = Field(None, description="the key sets' master secret, a file with owner-only permissions "
                                    "(default $FLIPAD_KEY_SECRET_FILE, else $FLIPAD_KEY_SECRET)")
    secret_block: str | None = Field(None, description="the master secret as a Prefect Secret block of this name")


@dataclass(frozen=True)
class AttributeResult:
    rows: pd.DataFrame  # every committed row for this output (all runs)
    new_rows: int
    listed: int
    batches: int
    seconds: float
    drift: dict[str, dict]  # model -> machine-readable monitoring of this run's rows: alarm, monitors, Evidently drift
    reports: dict[str, str]  # model -> where the HTML report went


@lru_cache(maxsize=16)
def _model(tracking_uri: str, name: str, version: str, secret_file: str | None, secret_block: str | None):
    """The registered pyfunc's Python model, loaded once per process (also in each Dask worker),
    with the owner's secret handed to its detector when the detector's kind declares one."""
    use_tracking(tracking_uri)
    model = load_model(name, version)[0]
    kind = type(model.detector)
    if kind.secret:
        secret = master_secret(secret_file, secret_block)
        if secret is None:
            raise ValueError(f"{name} v{version} is a {kind.kind} detector, which needs the owner's secret "
                             f"({kind.secret}): give --secret-file, --secret-block or FLIPAD_KEY_SECRET_FILE")
        model.detector.use_secret(secret)
    return model


@lru_cache(maxsize=16)
def _keysets(tracking_uri: str, name: str, secret_file: str | None, secret_block: str | None) -> tuple[KeySet, ...]:
    """The key sets of the model ``name`` rebuilt from the master secret (empty without key sets or a secret)."""
    use_tracking(tracking_uri)
    if not public_keysets(name):
        return ()
    secret = master_secret(secret_file, secret_block)
    return tuple(keysets(name, secret)) if secret else ()


@task(name="list-new-items", retries=2, retry_delay_seconds=2, persist_result=False)
def list_new_items(config: AttributeConfig, detectors: list[ResolvedVersion]) -> tuple[list[tuple[ObjectRef, list[int]]], int]:
    """Items not yet committed for each detector version (by URI and ETag), and how many were listed."""
    results = open_results(config.output, config.endpoint_url)
    done = results.processed()
    listed, todo = 0, []
    for ref in open_source(config.input, config.endpoint_url, results).list():
        listed += 1
        need = [k for k, d in enumerate(detectors) if (ref.uri, ref.etag, d.name, d.version) not in done]
        if need:
            todo.append((ref, need))
    return todo, listed


def _error_row(ref: ObjectRef, detector: ResolvedVersion, error: str, threshold: float = float("nan")) -> dict:
    return _row(ref, detector, ItemResult(None, threshold, None, error))


def _row(ref: ObjectRef, detector: ResolvedVersion, result: ItemResult) -> dict:
    return {"uri": ref.uri, "model": detector.name, "version": detector.version, **result.as_row(), "etag": ref.etag,
            "scored_at": datetime.now(timezone.utc).isoformat(timespec="microseconds")}


@task(name="score-batch", tags=["inversion"], retries=2, retry_delay_seconds=2, persist_result=False)
def score_batch(
    config: AttributeConfig, tracking_uri: str, detectors: list[ResolvedVersion], batch: list[tuple[ObjectRef, list[int]]]
) -> pd.DataFrame:
    """Download one batch (bounded memory), score each item with the detectors that still need it."""
    source = open_source(config.input, config.endpoint_url)
    payload: dict[str, bytes] = {}
    rows: list[dict] = []
    for ref, need in batch:
        if ref.size > config.max_item_bytes:
            rows += [_error_row(ref, detectors[k], f"item of {ref.size} bytes exceeds the limit of {config.max_item_bytes}") for k in need]
            continue
        try:
            payload[ref.uri] = source.read(ref)
        except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            rows += [_error_row(ref, detectors[k], str(exc)) for k in need]
    for k, detector in enumerate(detectors):
        refs = [ref for ref, need in batch if k in need and ref.uri in payload]
        if not refs:
            continue
        keys = list(_keysets(tracking_uri, detector.name, config.secret_file, config.secret_block))
        model = _model(tracking_uri, detector.name, detector.version, config.secret_file, config.secret_block)
        results = model.score_bytes([payload[r.uri] for r in refs], keys)
        rows += [_row(ref, detector, result) for ref, result in zip(refs, results)]
    return pd.DataFrame(rows, columns=result_columns())


def batch_id(batch: list[tuple[ObjectRef, list[int]]], detectors: list[ResolvedVersion]) -> str:
    """Deterministic id of a batch's work: a retried batch overwrites its own part, never adds one."""
    digest = hashlib.sha256()
    for ref, need in batch:
        for k in need:
            digest.update(f"{ref.uri}\0{ref.etag}\0{detectors[k].name}\0{detectors[k].version}\n".encode())
    return digest.hexdigest()[:24]


def _watermark_name(detector: ResolvedVersion) -> str:
    return f"monitored-{detector.name}-v{detector.version}.json"


def _unmonitored(results, rows: pd.DataFrame, detector: ResolvedVersion) -> pd.DataFrame:
    """The committed rows of ``detector`` no drift report has covered yet: this run's and those of
    earlier runs that were killed or failed before they monitored."""
    mine = rows[(rows["model"] == detector.name) & (rows["version"].astype(str) == detector.version)]
    mark = results.get(results.side_file_name(_watermark_name(detector)))
    if mark is not None:
        mine = mine[mine["scored_at"].astype(str) > json.loads(mark)["through"]]
    return mine


def _monitor(config: AttributeConfig, detector: ResolvedVersion, window: pd.DataFrame, results) -> tuple[dict, str]:
    """The monitors (:mod:`monitoring.monitors`) of the unmonitored rows of one detector against its
    onboarding reference, and the Evidently drift report (for reading, not alarming). The report
    is stored next to the results; metrics, sentences and the report go to MLflow; alarms to the
    run log, a Prefect artifact and the webhook; the watermark moves past the rows."""
    reference = load_reference(detector.run_id)
    monitors = run_monitors(reference, window)
    alarms = [m for m in monitors if m.alarm]
    scored = window[window["error"] == ""]
    base = reference[reference["source"].isin((OWN, "real"))]
    drift = check_drift(base, scored, drift_share=config.drift_share) if len(scored) >= 2 else None
    stamps = window["scored_at"].astype(str)
    span = f"{len(window)} items scored {stamps.min()} to {stamps.max()}"
    title = f"flipad monitoring: {detector.name} v{detector.version}, {span}"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    where = ""
    html = drift.html(title) if drift is not None else ""
    if drift is not None:
        where = results.put(results.side_file_name(f"drift-{detector.name}-v{detector.version}-{stamp}.html"), html.encode())
    keyed = _keyed_shares(window)
    summary = {"alarm": bool(alarms), "alarms": [m.sentence for m in alarms], "monitors": [m.as_dict() for m in monitors],
               "keyed_share": keyed,
               **(drift.summary() if drift is not None else {"n_current": 0}), "window": span, "report": where}
    metrics = {"alarm": float(bool(alarms)), "items": float(len(window)),
               "error_fraction": float((window["error"] != "").mean()),
               **{f"keyed_share_v{version}": share for version, share in keyed.items()},
               **{f"monitor_{m.name}_{k}": v for m in monitors
                  for k, v in (("value", m.value), ("reference", m.reference), ("alarm", float(m.alarm)))}}
    if drift is not None:
        metrics |= {"drift_detected": float(drift.drifted), "drift_share": drift.drift_share,
                    "attributed_fraction": drift.attributed_fraction,
                    "reference_attributed_fraction": drift.reference_attributed_fraction,
                    **{metric_name(c, v): v["value"] for c, v in drift.columns.items()}}
    log_monitoring_run(detector.name, detector.version, detector.run_id, detector.model_id, metrics, summary, html, span,
                       [m.sentence for m in monitors], [m.sentence for m in alarms])
    results.put(results.side_file_name(_watermark_name(detector)), json.dumps({"through": stamps.max()}).encode())
    create_markdown_artifact(
        key=f"monitoring-{detector.name}".lower().replace("_", "-").replace(".", "-"),
        markdown=_monitor_markdown(detector, monitors, span, where),
        description="flipad stream monitoring",
    )
    log = get_run_logger()
    for alarm in alarms:
        log.warning("ALARM %s v%s, %s: %s", detector.name, detector.version, alarm.name, alarm.sentence)
    if alarms and config.webhook:
        _post_alert(config.webhook, {"model": detector.name, "version": detector.version, **summary})
    if not alarms:
        log.info("no alarm for %s v%s over %s; report %s", detector.name, detector.version, span, where)
    return summary, where


def _keyed_shares(window: pd.DataFrame) -> dict[str, float]:
    """Per key set version, the share of attributed items that carry one of its keys (reported,
    never alarmed on: which recipients' content arrives is the stream's business)."""
    if "key_set" not in window:
        return {}
    attributed = window[window["verdict"] == "attributed"] if "verdict" in window else window.iloc[:0]
    read = attributed[attributed["key_set"].fillna("").astype(str) != ""]
    if not len(read):
        return {}
    keyed = read[read["key_id"].fillna("").astype(str) != ""]
    return {str(v): float((keyed["key_set"].astype(str) == str(v)).sum() / len(attributed))
            for v in sorted(read["key_set"].astype(str).unique())}


def _monitor_markdown(detector: ResolvedVersion, monitors: list[MonitorResult], span: str, where: str) -> str:
    """The monitors of one window as a Prefect artifact: the alarms' sentences, then every monitor."""
    alarms = [m for m in monitors if m.alarm]
    rows = "\n".join(f"| {m.name} | {m.protects} | {m.value:.4g} | {m.reference:.4g} | {m.n} | {m.p_value:.3g} | "
                     f"{'**ALARM**' if m.alarm else 'ok'} |" for m in monitors)
    said = "\n".join(f"- **{m.name}**: {m.sentence}" for m in alarms) or "No alarm."
    return (f"## Monitoring of {detector.name} v{detector.version}: {'ALARM' if alarms else 'no alarm'}\n\n{span}; "
            f"Evidently drift report: {where or 'none'}\n\n{said}\n\n"
            f"| monitor | protects | value | reference | items | p-value | state |\n|---|---|---|---|---|---|---|\n{rows}\n")


def _post_alert(url: str, body: dict) -> None:
    request = urllib.request.Request(url, json.dumps(body, default=str).encode(), {"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=10).close()
    except OSError as exc:  # the alert is best effort; the warning above is already logged
        get_run_logger().warning("alarm webhook %s failed: %s", redact_url(url), exc)


def _score_and_commit(config: AttributeConfig, tracking_uri: str, detectors: list[ResolvedVersion],
                      batches: list, results) -> tuple[list[pd.DataFrame], list[Exception]]:
    """Score the batches with at most ``config.in_flight`` submitted at a time and commit each as
    soon as it is scored, in order: memory stays bounded and a killed run keeps what it committed.
    Each commit is reported on the flow run's log and on the ``flipad.progress`` logger."""
    new_frames: list[pd.DataFrame] = []
    failures: list[Exception] = []
    pending: deque = deque()
    total, done = sum(len(b) for b in batches), [0, 0]  # batches settled, items settled

    def settle(batch, future) -> None:
        done[0], done[1] = done[0] + 1, done[1] + len(batch)
        try:
            rows = future.result()
        except Exception as exc:  # keep committing the others; the run fails at the end
            failures.append(exc)
            message = f"batch {done[0]}/{len(batches)} failed ({exc}); {done[1]}/{total} items settled"
        else:
            results.commit(batch_id(batch, detectors), rows)
            new_frames.append(rows)
            message = f"batch {done[0]}/{len(batches)} committed; {done[1]}/{total} items settled"
        get_run_logger().info(message)
        progress.info(message)

    for batch in batches:
        if len(pending) >= config.in_flight:
            settle(*pending.popleft())
        pending.append((batch, score_batch.submit(config, tracking_uri, detectors, batch)))
    while pending:
        settle(*pending.popleft())
    return new_frames, failures


@flow(name="attribute-stream")
def attribute_stream(config: AttributeConfig) -> AttributeResult:
    """Score every new item of ``config.input`` with each requested detector; commit per batch; monitor drift."""
    start = time.perf_counter()
    tracking_uri = connect()
    detectors = [resolve_version(*parse_model_ref(ref)) for ref in config.models]
    master_secret(config.secret_file, config.secret_block)  # a missing or world-readable secret file fails here, before any work
    for detector in detectors:  # so does a detector whose kind needs the secret when none is given
        _model(tracking_uri, detector.name, detector.version, config.secret_file, config.secret_block)
    results = open_results(config.output, config.endpoint_url)
    results.check_writable()
    with results.lease():
        todo, listed = list_new_items(config, detectors)
        batches = [todo[i : i + config.batch_size] for i in range(0, len(todo), config.batch_size)]
        new_frames, failures = _score_and_commit(config, tracking_uri, detectors, batches, results)
        all_rows = results.consolidate()
        if failures:
            raise RuntimeError(f"{len(failures)} of {len(batches)} batches failed (first: {failures[0]}); "
                               "committed batches are kept, rerun to resume") from failures[0]
        drift, reports = {}, {}
        for detector in detectors if config.monitor and len(all_rows) else ():
            window = _unmonitored(results, all_rows, detector)
            if len(window):
                drift[detector.name], reports[detector.name] = _monitor(config, detector, window, results)
    new_rows = concat_rows(new_frames, result_columns())
    return AttributeResult(all_rows, len(new_rows), listed, len(batches), time.perf_counter() - start, drift, reports)
