"""Where the onboarding flow's cached stage results live, how long they count, and pruning them.

The inversion stages (``compute-features``, ``latent-search``) persist their results through
Prefect so that a rerun with the same generator, samples and configuration skips them. Their
records are written under ``flipad-stages/`` in Prefect's local result storage
(``$PREFECT_RESULTS_LOCAL_STORAGE_PATH``, by default ``$PREFECT_HOME/storage``), count as a cache
hit for :data:`STAGE_CACHE_TTL`, and are deleted by :func:`prune` (``flipad cache prune``);
Prefect itself never deletes result files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

__all__ = ["STAGE_CACHE_PREFIX", "STAGE_CACHE_TTL", "PruneResult", "prune", "stage_cache_dir"]

STAGE_CACHE_PREFIX = "flipad-stages"
STAGE_CACHE_TTL = timedelta(days=7)


def stage_cache_dir() -> Path:
    """The folder of the cached stage results under Prefect's current local result storage."""
    from prefect.settings import get_current_settings

    return Path(get_current_settings().results.local_storage_path).expanduser() / STAGE_CACHE_PREFIX


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune` removed from ``folder`` and what it kept."""

    folder: Path
    removed: int
    freed_bytes: int
    kept: int


def prune(older_than: timedelta = STAGE_CACHE_TTL, folder: Path | None = None) -> PruneResult:
    """Delete cached stage results last written more than ``older_than`` ago (all with zero)."""
    folder = folder or stage_cache_dir()
    cutoff = time.time() - older_than.total_seconds()
    removed = freed = kept = 0
    for path in folder.rglob("*") if folder.is_dir() else ():
        if not path.is_file() or path.is_symlink():
            continue
        stat = path.stat()
        if stat.st_mtime <= cutoff:
            path.unlink(missing_ok=True)
            removed, freed = removed + 1, freed + stat.st_size
        else:
            kept += 1
    return PruneResult(folder, removed, freed, kept)
