"""Keep secrets out of what MLflow stores: credentials in URLs and secret-looking parameters."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["REDACTED", "redact_params", "redact_url"]

REDACTED = "***"
SECRET_KEY = re.compile(r"(pass(word)?|secret|token|credential|api[_-]?key|access[_-]?key|signature|auth)", re.I)


def redact_url(value: str) -> str:
    """``value`` with a URL's password and secret-looking query values replaced by ``***``; other text unchanged."""
    if "://" not in value:
        return value
    try:
        parts = urlsplit(value)
        netloc = parts.netloc
        if parts.password is not None:
            netloc = f"{parts.username}:{REDACTED}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        query = urlencode([(k, REDACTED if SECRET_KEY.search(k) else v)
                           for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
    except ValueError:  # not a parsable URL after all: drop everything after the scheme's host part
        return value.split("://", 1)[0] + "://" + REDACTED
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _redact(key: str, value: Any) -> Any:
    if SECRET_KEY.search(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_redact(key, v) for v in value)
    if isinstance(value, dict):
        return {k: _redact(k, v) for k, v in value.items()}
    return value


def redact_params(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters safe to log: secret-named keys masked, URL credentials stripped (recursively)."""
    return {k: _redact(k, v) for k, v in params.items()}
