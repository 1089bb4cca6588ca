"""Background server processes on this machine: start detached, wait for health, stop by PID.

Each process is started as the leader of a new session, so stopping it stops its process group
(uvicorn/gunicorn children included), and any descendant that left the group is stopped too.
A PID is only signalled while its recorded start time still matches, so a recycled PID is never
touched.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

__all__ = ["Handle", "free_port", "port_in_use", "spawn", "wait_http", "alive", "stop", "log_tail"]


@dataclass(frozen=True)
class Handle:
    """A started process, as recorded in a state file: PID plus its start time (psutil's create_time)."""

    name: str
    pid: int
    started: float
    log: str

    def to_dict(self) -> dict:
        return asdict(self)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """Whether something accepts connections on ``host:port``."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def spawn(name: str, cmd: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> Handle:
    """Start ``cmd`` detached (own session), output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=cwd, start_new_session=True)
    return Handle(name, proc.pid, psutil.Process(proc.pid).create_time(), str(log))


def _process(handle: Handle) -> psutil.Process | None:
    try:
        proc = psutil.Process(handle.pid)
        if abs(proc.create_time() - handle.started) > 0.01 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.NoSuchProcess:
        return None


def alive(handle: Handle) -> bool:
    """Whether the recorded process (not a later one with a recycled PID) still runs."""
    return _process(handle) is not None


def log_tail(handle: Handle, chars: int = 2000) -> str:
    try:
        return Path(handle.log).read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def wait_http(url: str, timeout: float, handle: Handle | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early if the process behind it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle is not None and not alive(handle):
            raise RuntimeError(f"{handle.name} exited during start-up; log {handle.log}:\n{log_tail(handle)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def stop(handle: Handle, sig: int = signal.SIGTERM, grace: float = 15.0) -> bool:
    """Stop the process, its group and every descendant: ``sig`` first, SIGKILL after ``grace`` seconds.

    Returns False when the process was already gone.
    """
    proc = _process(handle)
    if proc is None:
        return False
    family = [proc]
    try:
        family += proc.children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    try:
        os.killpg(handle.pid, sig)  # our process is its group's leader (new session at spawn)
    except ProcessLookupError:
        pass
    for member in family[1:]:
        try:
            member.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(family, timeout=grace)
    for member in left:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=5)
    return True
