"""Key sets of keyed sampling in MLflow: only what may be public (versions, names, key ids).

A key set version is a run in the experiment ``flipad/NAME/keys`` with its public description
(``keyset.json``: the version, the latent size, each recipient's name and key id) as an
artifact, and a tag ``flipad.keyset.vN`` on the registered model pointing at that run. The
master secret and the keys derived from it never reach MLflow: :class:`flipad.keys.KeySet`
rebuilds them from the secret and this description.
"""

from __future__ import annotations

import json

import mlflow
from mlflow.tracking import MlflowClient

from flipad.keys import KeySet

from .store import experiment_name

__all__ = ["KEYSET_TAG", "keysets", "next_keyset_version", "public_keysets", "register_keyset"]

KEYSET_TAG = "flipad.keyset.v"


def public_keysets(name: str) -> dict[str, dict]:
    """Version -> public description of every key set registered for the model ``name``."""
    tags = MlflowClient().get_registered_model(name).tags or {}
    out = {}
    for tag, run_id in tags.items():
        if tag.startswith(KEYSET_TAG):
            out[tag.removeprefix(KEYSET_TAG)] = mlflow.artifacts.load_dict(f"runs:/{run_id}/keyset.json")
    return dict(sorted(out.items(), key=lambda item: int(item[0])))


def next_keyset_version(name: str) -> str:
    """The version a new key set of ``name`` gets: one more than the newest."""
    return str(max(map(int, public_keysets(name)), default=0) + 1)


def register_keyset(name: str, keys: KeySet) -> str:
    """Record ``keys``' public description for the registered model ``name``; returns the run id."""
    public = keys.public()
    mlflow.set_experiment(f"{experiment_name(name)}/keys")
    description = (f"Key set version {keys.version} of [{name}](#/models/{name}): {len(keys.recipients)} recipients "
                   "(names and key ids in keyset.json; the keys themselves are derived from the owner's secret "
                   "and never logged). Older versions stay decodable.")
    with mlflow.start_run(run_name=f"keyset-{name}-v{keys.version}",
                          tags={"model": name, "flipad.keyset": keys.version, "mlflow.note.content": description}) as run:
        mlflow.log_params({"keyset_version": keys.version, "recipients": len(keys.recipients),
                           "latent_dim": keys.latent_dim})
        mlflow.log_dict(public, "keyset.json")
    MlflowClient().set_registered_model_tag(name, f"{KEYSET_TAG}{keys.version}", run.info.run_id)
    return run.info.run_id


def keysets(name: str, secret: bytes) -> list[KeySet]:
    """Every key set version of ``name``, its keys rebuilt from ``secret``."""
    return [KeySet(secret, [r["name"] for r in public["recipients"]], public["latent_dim"], version)
            for version, public in public_keysets(name).items()]
