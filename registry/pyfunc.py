"""The detector as an MLflow pyfunc model: base64 images (or ``.npy`` arrays) in, score/threshold/verdict out.

The model is logged from code (``registry/model_code.py``), its artifact is a detector bundle
(:mod:`flipad.detectors.bundle`: JSON + safetensors, no pickles) and ``code_paths`` carries the ``flipad``
and ``registry`` packages, so ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` need only
the pip requirements, not this repository.
"""

from __future__ import annotations

import base64
import binascii
import os

import mlflow.pyfunc
import pandas as pd

from flipad.detectors.bundle import load_bundle
from flipad.scoring import ItemResult, item_columns, score_items, served_columns
from flipad.keys import KeySet, secret_from_environment

from .keysets import keysets

__all__ = ["FlipadModel", "INPUT_COLUMN", "to_request_cell"]

INPUT_COLUMN = "image"

def to_request_cell(data: bytes) -> str:
    """A request cell: base64 of PNG/JPEG bytes or of ``.npy`` bytes."""
    return base64.b64encode(data).decode("ascii")


def _decode_cell(cell) -> bytes:
    if isinstance(cell, bytes):
        return cell
    try:
        return base64.b64decode(str(cell), validate=True)
    except (binascii.Error, ValueError):
        return b""  # scored as an undecodable item, with its error row


class FlipadModel(mlflow.pyfunc.PythonModel):
    """Scores a DataFrame column ``image`` of base64 PNG/JPEG (or ``.npy``) items.

    Returns one row per input with ``score`` (higher = more typical of the generator),
    ``threshold``, ``is_generated`` (None when undecided), ``verdict`` (attributed, not
    attributed, undecided or error), ``reason`` (why undecided) and ``error`` (empty unless the
    item could not be scored); for a generator with key sets, served with the owner's secret
    (``FLIPAD_KEY_SECRET_FILE`` or ``FLIPAD_KEY_SECRET``) and its tracking server reachable,
    ``key_id`` (the recipient; empty for "no key"), ``key_bits_correct`` and ``key_p_value``.
    Runs on CUDA when the serving machine has it (``FLIPAD_DEVICE`` overrides).
    """

    def load_context(self, context) -> None:
        secret = secret_from_environment()
        self.detector = load_bundle(context.artifacts["bundle"], device=os.environ.get("FLIPAD_DEVICE", "auto"),
                                    secret=secret)
        name = (getattr(context, "model_config", None) or {}).get("name")
        self.keysets = keysets(name, secret) if name and secret else []

    def score_bytes(self, items: list[bytes], keysets: list[KeySet] | None = None) -> list[ItemResult]:
        """Score raw encoded items (the flow's entry point, without base64); ``keysets`` (default:
        those loaded with the model) read the recipients of attributed items."""
        return score_items(self.detector, items, self.keysets if keysets is None else keysets)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            if INPUT_COLUMN not in model_input.columns:
                raise ValueError(f"the request needs a column {INPUT_COLUMN!r} of base64-encoded images")
            cells = model_input[INPUT_COLUMN].tolist()
        else:
            cells = list(model_input)
        results = self.score_bytes([_decode_cell(c) for c in cells])
        return pd.DataFrame([r.as_row() for r in results], columns=item_columns())[[c.name for c in served_columns()]]
