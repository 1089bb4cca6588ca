"""Saved detectors: ``config.json`` plus ``tensors.safetensors`` in a folder; never a pickle."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["FORMAT_VERSION", "write_saved", "read_saved", "check_generator"]

FORMAT_VERSION = 1


def write_saved(folder: str | Path, kind: str, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write one detector's ``config`` (JSON) and ``tensors`` (safetensors) into ``folder``, each file atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format_version": FORMAT_VERSION, "kind": kind, **config}
    tmp_tensors, tmp_config = folder / "tensors.safetensors.tmp", folder / "config.json.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp_tensors))
    tmp_config.write_text(json.dumps(config, indent=2))
    tmp_tensors.replace(folder / "tensors.safetensors")
    tmp_config.replace(folder / "config.json")
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
