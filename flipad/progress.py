"""Progress of long work a person waits for: a line as each stage starts and ends, and while one runs.

``with stage("latent search [validation]", total=1000):`` logs a start line and, on leaving, an
end line with the count and the elapsed time (or that it failed). Loops inside report what they
finished with :func:`report`; it counts toward the innermost open stage and is free when none is
open. While any stage is open a heartbeat thread logs the innermost one's count, elapsed time
and an estimate of the time left every ``interval`` seconds (15 by default), so a log is never
silent for longer, whatever the loop in progress. Lines go to the ``flipad.progress`` logger; the
command line shows them on stderr, the flows forward them to the flow run's log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = ["Stage", "report", "set_interval", "stage", "INTERVAL"]

logger = logging.getLogger("flipad.progress")

INTERVAL = 15.0  # seconds between lines while a stage runs


@dataclass
class Stage:
    """An open stage: its name, how many ``unit`` it will do (``total``, None when unknown) and has done."""

    name: str
    total: int | None = None
    unit: str = "items"
    done: int = 0
    started: float = field(default_factory=time.monotonic)

    def status(self) -> str:
        """``name: done/total unit after N s, about M s left`` (what is known of it)."""
        elapsed = time.monotonic() - self.started
        count = f"{self.done}/{self.total} {self.unit}" if self.total else f"{self.done} {self.unit}" if self.done else ""
        left, bar = "", ""
        if self.total:
            filled = min(20, round(20 * self.done / self.total))
            bar = f"[{'#' * filled}{'.' * (20 - filled)}] "
            if 0 < self.done < self.total:
                left = f", about {elapsed / self.done * (self.total - self.done):.0f} s left"
        return f"{self.name}: {bar}{count + ' ' if count else ''}after {elapsed:.0f} s{left}"


class _Tracker:
    """The open stages of this process and the heartbeat thread that speaks for the innermost."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open: list[Stage] = []
        self.last_line = 0.0
        self.interval = INTERVAL
        self.thread: threading.Thread | None = None

    def say(self, message: str) -> None:
        self.last_line = time.monotonic()
        logger.info(message)

    def push(self, item: Stage) -> None:
        with self.lock:
            self.open.append(item)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._beat, name="flipad-progress", daemon=True)
                self.thread.start()

    def pop(self, item: Stage) -> None:
        with self.lock:
            self.open.remove(item)

    def innermost(self) -> Stage | None:
        with self.lock:
            return self.open[-1] if self.open else None

    def _beat(self) -> None:
        while True:
            time.sleep(min(1.0, self.interval / 4))
            with self.lock:
                if not self.open:
                    self.thread = None
                    return
                current = self.open[-1]
            if time.monotonic() - self.last_line >= self.interval:
                self.say(f"  {current.status()}")


_TRACKER = _Tracker()


@contextmanager
def stage(name: str, total: int | None = None, unit: str = "items") -> Iterator[Stage]:
    """Log ``name`` starting and ending (with ``total`` ``unit`` and the elapsed time), with
    heartbeat lines in between; yields the :class:`Stage` (``report`` advances it)."""
    item = Stage(name, total, unit)
    _TRACKER.say(f"{name}: started" + (f" ({total} {unit})" if total else ""))
    _TRACKER.push(item)
    try:
        yield item
    except BaseException:
        _TRACKER.say(f"{name}: failed after {time.monotonic() - item.started:.1f} s")
        raise
    finally:
        _TRACKER.pop(item)
    count = f"{item.total or item.done} {unit}, " if (item.total or item.done) else ""
    _TRACKER.say(f"{name}: done ({count}{time.monotonic() - item.started:.1f} s)")


def set_interval(seconds: float) -> None:
    """Seconds between heartbeat lines (a terminal redrawing one line in place can take 1)."""
    _TRACKER.interval = float(seconds)


def report(done: int = 1) -> None:
    """``done`` more units of the innermost open stage are finished (nothing happens when none is open)."""
    current = _TRACKER.innermost()
    if current is not None:
        current.done += done
