"""Saved detectors: ``config.json`` plus ``tensors.safetensors`` in a folder; never a pickle."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ..io.files import atomic_write

__all__ = ["FORMAT_VERSION", "write_saved", "read_saved", "check_generator"]

FORMAT_VERSION = 1


def write_saved(folder: str | Path, kind: str, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write one detector's ``config`` (JSON) and ``tensors`` (safetensors) into ``folder``, each file atomically."""
    folder = Path(folder)
    config = {"format_version": FORMAT_VERSION, "kind": kind, **config}
    # tensors first: a config.json only ever describes tensors that are complete
    atomic_write(folder / "tensors.safetensors", save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))
    atomic_write(folder / "config.json", json.dumps(config, indent=2).encode())
    return folder


def read_saved(folder: str | Path, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and tensors written by :func:`write_saved` for a detector of ``kind``; ValueError otherwise."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        tensors = load_file(str(folder / "tensors.safetensors"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder} does not hold a saved {kind} detector ({exc})") from exc
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder}: unsupported detector format {config.get('format_version')}")
    if config.get("kind", "flipad") != kind:
        raise ValueError(f"{folder} holds a {config.get('kind')} detector, not a {kind} one")
    return config, tensors


def check_generator(folder: str | Path, saved_sha256: str, live_sha256: str) -> None:
    """Refuse to pair a saved detector with a generator whose weights differ from the fitted one's."""
    if saved_sha256 != live_sha256:
        raise ValueError(f"{folder} was fitted for generator sha256 {saved_sha256[:12]}..., but this generator is "
                         f"{live_sha256[:12]}...; load it with the same weights")
