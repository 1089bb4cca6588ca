"""The CPU threads flipad's compute runs on, sized to what this process may use.

Two measured failures on shared machines (docs/design.md, "Sharing the cores"):

- OpenMP's default wait policy spins each idle compute thread on its core between parallel
  regions. Beside one other CPU-bound process on two cores, a fit took 3.3-3.8x its idle time
  (issue 32 saw an onboarding take 13x), much of it spinning. Passive waiting puts idle threads
  to sleep: 1.6x for the fit, 1.49x for a whole onboarding (``python -m bench shared_cores``).
  The policy is read once, when torch loads its OpenMP runtime, so :func:`share_cores` sets it
  before flipad imports torch unless the caller set ``OMP_WAIT_POLICY`` (or ``GOMP_SPINCOUNT``).
- torch starts one thread per core of the host, not per core the process may use. In a
  container limited by a CPU quota (``docker run --cpus 2``) or pinned to a few cores, that is
  many threads on few cores. :func:`usable_cpus` reads the affinity mask and the cgroup quota,
  and :func:`size_threads` gives torch that many unless ``OMP_NUM_THREADS`` says otherwise.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

__all__ = ["share_cores", "size_threads", "usable_cpus"]

logger = logging.getLogger(__name__)

# where cgroup v2 and v1 hold this process's CPU quota (a container's --cpus)
CGROUP_V2_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1 = Path("/sys/fs/cgroup/cpu")


def _cgroup_quota(v2_max: Path = CGROUP_V2_MAX, v1: Path = CGROUP_V1) -> float | None:
    """CPUs the cgroup quota allows (quota / period), or None where there is no quota."""
    try:
        if v2_max.is_file():
            quota, period = v2_max.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_file, period_file = v1 / "cpu.cfs_quota_us", v1 / "cpu.cfs_period_us"
        if quota_file.is_file() and period_file.is_file():
            quota = int(quota_file.read_text())
            return None if quota <= 0 else quota / int(period_file.read_text())
    except (OSError, ValueError) as exc:  # an unreadable or odd file: no quota known
        logger.debug("no cgroup CPU quota read: %s", exc)
    return None


def usable_cpus(v2_max: Path = CGROUP_V2_MAX, v1: Path = CGROUP_V1) -> int:
    """How many CPUs this process may run on at once: the cores of its affinity mask, capped by
    its cgroup's CPU quota (rounded up), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(v2_max, v1)
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def share_cores() -> None:
    """Make idle compute threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``), unless
    the environment chose a wait policy. Takes effect only when called before torch is imported,
    as ``flipad/__init__`` does; it says so at debug level otherwise."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if "torch" in sys.modules:
        logger.debug("torch was imported before flipad: its OpenMP threads keep the default wait policy")


def size_threads() -> int:
    """Give torch's intra-op pool :func:`usable_cpus` threads where it has more and
    ``OMP_NUM_THREADS`` does not set the number; returns the pool's size."""
    import torch

    usable = usable_cpus()
    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > usable:
        torch.set_num_threads(usable)
    return torch.get_num_threads()
