"""Registered detector versions: register with tags and aliases, promote, list, load by alias."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from flipad.detectors.base import Detector

__all__ = ["CHAMPION", "CHALLENGER", "Registration", "RegistrationError", "ResolvedVersion", "register_version", "resolve_version", "load_model", "load_detector", "list_versions", "parse_model_ref", "logged_model_id"]

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
REGISTRATION_TAG = "flipad.registration"  # "pending" from creation until alias and description are set


class RegistrationError(RuntimeError):
    """A version could not be registered completely; it was removed (or will be by the next registration)."""


def _remove_unfinished(client: MlflowClient, name: str) -> None:
    """Delete versions of ``name`` an interrupted registration left pending (no alias, no description)."""
    for mv in client.search_model_versions(f"name='{name}'"):
        if mv.tags.get(REGISTRATION_TAG) == "pending":
            logger.warning("removing %s version %s, left unfinished by an interrupted registration", name, mv.version)
            client.delete_model_version(name, str(mv.version))
PROMOTE_POLICIES = ("auto", "always", "never")


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    alias: str
    metric: float
    champion_metric: float | None  # the previous champion on the same held-out evaluation
    reason: str = ""  # why this alias, with both figures
    same_generator: tuple[str, ...] = ()  # other registered detectors of the same generator weights


def parse_model_ref(ref: str) -> tuple[str, str]:
    """``NAME``, ``NAME@ALIAS`` or ``NAME/VERSION`` as (name, "@alias" or version); default alias champion."""
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, f"@{alias}"
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        if version.isdigit():
            return name, version
    return ref, f"@{CHAMPION}"


def model_uri(name: str, which: str) -> str:
    return f"models:/{name}{which}" if which.startswith("@") else f"models:/{name}/{which}"


def champion_version(name: str) -> str | None:
    """The version the ``champion`` alias points at, or None."""
    try:
        return str(MlflowClient().get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


@dataclass(frozen=True)
class ResolvedVersion:
    name: str
    version: str
    run_id: str  # the onboarding run
    model_id: str = ""  # the MLflow 3 logged model behind the version


def resolve_version(name: str, which: str = f"@{CHAMPION}") -> ResolvedVersion:
    """The concrete version behind an alias (``@champion``) or a version number, with its onboarding run."""
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, which[1:]) if which.startswith("@") else client.get_model_version(name, which)
    except MlflowException as exc:
        shown = which if which.startswith("@") else f"/{which}"
        raise LookupError(f"no registered detector {name}{shown} ({exc.message.splitlines()[0]}); "
                          "run 'flipad models' to see what exists") from exc
    return ResolvedVersion(name, str(mv.version), (mv.tags or {}).get("run_id") or mv.run_id or "", logged_model_id(mv))


def logged_model_id(mv) -> str:
    """The MLflow 3 logged model behind a model version: its ``model_id``, which MLflow 3.17
    leaves empty for versions registered from ``models:/<id>``, else that source's id."""
    source = mv.source or ""
    return mv.model_id or (source.removeprefix("models:/") if source.startswith("models:/m-") else "")


def load_model(name: str, which: str = f"@{CHAMPION}"):
    """The pyfunc's Python model (a :class:`registry.pyfunc.FlipadModel`) and its version number."""
    version = resolve_version(name, which).version
    return mlflow.pyfunc.load_model(model_uri(name, version)).unwrap_python_model(), version


def load_detector(name: str, which: str = f"@{CHAMPION}") -> tuple[Detector, str]:
    """The fitted detector registered as ``name`` (alias or version) and its version number."""
    python_model, version = load_model(name, which)
    return python_model.detector, version


@contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """MLflow's own prints to stderr ("Registered model ... already exists. Creating a new version")
    silenced, unless its logger is at INFO or below (``flipad -v``)."""
    from mlflow.utils import logging_utils

    if logging.getLogger("mlflow").getEffectiveLevel() <= logging.INFO:
        yield
        return
    logging_utils.disable_logging()
    try:
        yield
    finally:
        logging_utils.enable_logging()


def register_version(
    name: str,
    model_uri: str,
    metric: float,
    evaluate_champion: Callable[[Detector], float],
    promote: str = "auto",
    tags: dict[str, str] | None = None,
    description: str = "",
) -> Registration:
    """Register ``model_uri`` as a new version of ``name`` and set its alias by the promotion policy.

    ``auto``: champion when ``metric`` is at least the current champion's on the same held-out
    evaluation (``evaluate_champion(champion_detector)``), else challenger; ``always``/``never``
    force it. A failure after the version exists deletes it again: no half-registered versions.
    """
    if promote not in PROMOTE_POLICIES:
        raise ValueError(f"promote must be one of {PROMOTE_POLICIES}, got {promote!r}")
    client = MlflowClient()
    current = champion_version(name)
    champion_metric = None
    if current is not None and promote == "auto":
        champion_metric = float(evaluate_champion(load_detector(name, current)[0]))
    if current is None or promote == "always":
        alias = CHAMPION
        reason = "first version of this model" if current is None else f"--promote always (champion was v{current})"
    elif promote == "never":
        alias = CHALLENGER
        reason = f"--promote never (champion stays v{current})"
    else:
        alias = CHAMPION if metric >= champion_metric else CHALLENGER
        relation = ">=" if alias == CHAMPION else "<"
        reason = (f"{metric:.4f} {relation} {champion_metric:.4f} of champion v{current}, both on this run's "
                  "held-out sets (worst-source balanced accuracy)")
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"Attribution detectors for generator {name} (flipad)")
    _remove_unfinished(client, name)
    shared = same_generator(name, tags["generator_sha256"]) if tags and tags.get("generator_sha256") else ()
    with _quiet_mlflow():
        version = mlflow.register_model(model_uri, name, tags={**(tags or {}), REGISTRATION_TAG: "pending"})
    try:
        decision = f"## Promotion\n{alias} when registered: {reason}.\n"
        if shared:
            decision += (f"\n## Same generator\nIts generator has the same weights as {', '.join(shared)}: "
                         "those detectors attribute the same items.\n")
            client.set_model_version_tag(name, str(version.version), "same_generator_as", ", ".join(shared))
        client.update_model_version(name, str(version.version), description=f"{description}\n\n{decision}".lstrip())
        client.set_registered_model_alias(name, alias, str(version.version))
        client.set_model_version_tag(name, str(version.version), "promotion", f"{alias}: {reason}")
        client.set_model_version_tag(name, str(version.version), REGISTRATION_TAG, "complete")
    except Exception as exc:
        try:
            client.delete_model_version(name, str(version.version))
            outcome = "the version was removed"
        except Exception:  # the server is gone
            outcome = (f"it could not be removed and stays tagged {REGISTRATION_TAG}=pending, without an alias, "
                       f"until the next registration of {name} removes it")
        raise RegistrationError(f"registering {name} version {version.version} failed ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); {outcome}") from exc
    if mlflow.active_run() is not None:  # the onboarding run records the decision beside its figures
        mlflow.set_tag("promotion", f"v{version.version} {alias}: {reason}")
        if champion_metric is not None:
            mlflow.log_metric("champion_worst_balanced_accuracy", champion_metric)
    logger.info("registered %s version %s as %s", name, version.version, alias)
    if shared:
        logger.warning("%s version %s has the same generator weights as %s", name, version.version, ", ".join(shared))
    return Registration(name, str(version.version), alias, metric, champion_metric, reason, shared)


def same_generator(name: str, generator_sha256: str) -> tuple[str, ...]:
    """The versions of other registered detectors (``NAME vN``) whose generator has the weights
    fingerprint ``generator_sha256``: the same generator under another name (for an autoencoder,
    the same decoder, whatever its encoder). Their verdicts attribute the same items."""
    found = MlflowClient().search_model_versions(f"tags.generator_sha256 = '{generator_sha256}'")
    return tuple(sorted({f"{v.name} v{v.version}" for v in found if v.name != name}))


def list_versions(name: str | None = None) -> list[dict]:
    """Every version (of ``name``, or of all registered detectors) with its aliases and key metrics."""
    client = MlflowClient()
    models = [client.get_registered_model(name)] if name else client.search_registered_models()
    rows = []
    for model in models:
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for mv in client.search_model_versions(f"name='{model.name}'"):
            metrics = client.get_run(mv.run_id).data.metrics if mv.run_id else {}
            rows.append({
                "name": model.name,
                "version": str(mv.version),
                "aliases": ",".join(sorted(aliases.get(str(mv.version), []))),
                "balanced_accuracy": metrics.get("worst_balanced_accuracy", metrics.get("primary_balanced_accuracy")),
                "created": mv.creation_timestamp,
                "generator_sha256": (mv.tags or {}).get("generator_sha256", "")[:12],
                "run_id": mv.run_id,
            })
    return sorted(rows, key=lambda r: (r["name"], int(r["version"])))
