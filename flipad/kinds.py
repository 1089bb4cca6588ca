"""The registry of detector kinds: what bundles, flows, the CLI, the output rows, the served model
and monitoring know of every family, filled by :func:`register_kind`.

It sits at the bottom of the package (it imports nothing of flipad), so the item schema in
:mod:`flipad.scoring` and the detectors above it read the same registry. A kind declares, as
class attributes of its detector class:

- ``kind`` (its name) and ``description``;
- ``Settings``: a frozen dataclass of its options, each with a default and ``metadata={"help": ...}``
  (``flipad onboard --set KIND.KEY=VALUE``; ``flipad families`` lists them);
- ``diagnostics``: the per-item figures its stages report, name -> meaning (a column of the rows);
- ``secret``: None, or what its secret is for; the flows resolve the secret (a file, an environment
  variable or a Prefect ``Secret`` block) and hand it to the detector, never through its settings.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Mapping
from typing import Any

__all__ = ["DETECTOR_ALIASES", "DETECTOR_KINDS", "detector_class", "diagnostic_columns", "family_settings",
           "import_kind", "register_kind", "setting_fields"]

DETECTOR_KINDS: dict[str, type] = {}
DETECTOR_ALIASES = {"combined": "attribution"}  # the command line's name for the verdict of both families


def register_kind(cls: type) -> type:
    """Class decorator: make ``cls`` available under ``cls.kind`` to bundles, flows, the CLI, the
    output rows, the served model and monitoring."""
    for attribute in ("kind", "description", "Settings", "diagnostics"):
        if not hasattr(cls, attribute):
            raise TypeError(f"detector kind {cls.__name__} must declare {attribute!r}")
    if not dataclasses.is_dataclass(cls.Settings):
        raise TypeError(f"{cls.__name__}.Settings must be a dataclass")
    if cls.kind in DETECTOR_KINDS and DETECTOR_KINDS[cls.kind] is not cls:
        raise ValueError(f"detector kind {cls.kind!r} is registered twice")
    DETECTOR_KINDS[cls.kind] = cls
    return cls


def detector_class(kind: str) -> type:
    """The detector class registered as ``kind`` (or an alias of it), or ``package.module:kind`` for
    a kind that module registers when imported (a family outside this package); ValueError naming
    the known kinds otherwise."""
    module, sep, name = kind.rpartition(":")
    if sep:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(f"cannot import {module!r} for the detector kind {name!r} ({exc})") from None
        kind = name
    kind = DETECTOR_ALIASES.get(kind, kind)
    if kind not in DETECTOR_KINDS:
        raise ValueError(f"unknown detector kind {kind!r}; known kinds: {', '.join(sorted(DETECTOR_KINDS))}")
    return DETECTOR_KINDS[kind]


def import_kind(kind: str, module: str | None) -> type:
    """The class of ``kind``, importing ``module`` (where a bundle says the kind was defined) first
    when the kind is not registered yet: a family outside this package loads where it is installed."""
    known = DETECTOR_ALIASES.get(kind, kind) in DETECTOR_KINDS
    return detector_class(kind if known or not module else f"{module}:{kind}")


def diagnostic_columns() -> dict[str, str]:
    """Every registered kind's per-item diagnostics, name -> meaning, in registration order."""
    columns: dict[str, str] = {}
    for cls in DETECTOR_KINDS.values():
        for name, meaning in cls.diagnostics.items():
            columns.setdefault(name, meaning)
    return columns


def setting_fields(kind: str) -> list[dataclasses.Field]:
    """The fields of ``kind``'s settings dataclass (name, default, ``metadata["help"]``)."""
    return list(dataclasses.fields(detector_class(kind).Settings))


def _coerce(flag: str, kind_type: Any, value: Any) -> Any:
    """``value`` (a string from the command line, or a JSON value) as the field's type."""
    origin = typing.get_origin(kind_type)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        (item_type, *_) = typing.get_args(kind_type) or (str,)
        return tuple(_coerce(flag, item_type, item.strip() if isinstance(item, str) else item)
                     for item in items if item != "")
    try:
        if kind_type is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind_type is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind_type is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        name = getattr(kind_type, "__name__", str(kind_type))
        raise ValueError(f"--set {flag}={value}: expected {name}") from None


def family_settings(overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Each named kind's settings with ``overrides`` (kind -> key -> value) applied and checked:
    one line naming ``KIND.KEY`` and what to do for an unknown kind, key or a wrong type."""
    out: dict[str, Any] = {}
    for kind, values in overrides.items():
        try:
            cls = detector_class(kind)
        except ValueError as exc:
            raise ValueError(f"--set {kind}.*: {exc}") from None
        hints = typing.get_type_hints(cls.Settings)
        names = {f.name for f in dataclasses.fields(cls.Settings)}
        changes = {}
        for key, value in values.items():
            if key not in names:
                known = ", ".join(f"{cls.kind}.{n}" for n in sorted(names)) or "none"
                raise ValueError(f"--set {kind}.{key}: unknown setting; {cls.kind} has {known} (flipad families)")
            changes[key] = _coerce(f"{kind}.{key}", hints[key], value)
        try:
            out[cls.kind] = dataclasses.replace(cls.Settings(), **changes)
        except ValueError as exc:
            raise ValueError(f"--set {kind}: {exc}") from None
    return out
