"""Writing files so that a reader sees the old content or the new, never a part of either."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write", "fill_once"]


def atomic_write(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` through a hidden temporary file in the same folder (named
    ``.NAME.<random>.tmp``), flushed to disk and renamed over ``path``; ``mode`` sets the new
    file's permissions (0o600: only its owner can read it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def fill_once(folder: Path, is_filled: Callable[[Path], bool], fill: Callable[[Path], None]) -> bool:
    """Fill ``folder`` by ``fill`` unless ``is_filled(folder)``; returns whether it is filled after.

    Processes filling one folder at once (test workers, flows on a fresh machine) take turns under
    a lock beside it (``.NAME.lock``), so the second finds the first one's files. ``fill`` writes
    into an empty staging folder that becomes ``folder`` in one rename (or whose files move into
    a ``folder`` that exists), so a fill that fails or is killed leaves no partial set behind."""
    with _locked(folder.with_name(f".{folder.name}.lock")):
        if is_filled(folder):
            return True
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            fill(staging)
            if folder.exists():  # a folder the caller named: the files move in one by one
                for path in sorted(staging.iterdir()):
                    path.replace(folder / path.name)
            else:  # whole, in one rename: a reader that takes no lock never sees a part
                staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return is_filled(folder)
