"""Onboarding shows its progress: stage lines on stderr from the start, never silent for 30 s."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import pytest
from servers import BIN

from flipad.progress import report, set_interval, stage


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_stages_say_when_they_start_and_end_and_speak_while_they_run():
    shown, handler = logging.getLogger("flipad.progress"), _Lines()
    level = shown.level
    shown.addHandler(handler)
    shown.setLevel(logging.INFO)
    set_interval(0.2)
    try:
        with stage("outer"):
            with stage("search [validation]", total=10):
                for _ in range(5):
                    report(1)
                time.sleep(0.8)
            with pytest.raises(ValueError), stage("failing"):
                raise ValueError("no")
    finally:
        set_interval(15.0)
        shown.removeHandler(handler)
        shown.setLevel(level)
    lines = handler.lines
    assert lines[:2] == ["outer: started", "search [validation]: started (10 items)"]
    beats = [line for line in lines if line.startswith("  search [validation]:")]
    assert beats and "5/10 items" in beats[-1] and "[##########..........]" in beats[-1] and "s left" in beats[-1]
    assert any(line.startswith("search [validation]: done (10 items, ") for line in lines)
    assert any(line.startswith("failing: failed after") for line in lines)
    assert lines[-1].startswith("outer: done (")


@pytest.mark.slow
def test_flipad_onboard_is_never_silent(tracking, user_generator, real_folder, tmp_path):
    """The first line within 10 s of the command's start, then a line at least every 30 s, on
    stderr (not a terminal: lines, not a redrawn bar), while it onboards with the default
    detector."""
    spec, weights = user_generator
    command = [str(BIN / "flipad"), "onboard", "progress-gen", "--generator", spec, "--weights", str(weights),
               "--latent-shape", "64", "--real", str(real_folder), "--num-samples", "100", "--num-validation", "60",
               "--set", "reconstruction.n_perturbed=30", "--num-test", "30", "--set", "reconstruction.encoder_steps=100", "--challenger-steps", "20"]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)  # the command's own temporary Prefect server, as a user's first run has
    start = time.monotonic()
    done = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    stamped: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: stamped.extend((time.monotonic() - start, line.rstrip()) for line in done.stderr))
    reader.start()
    out = done.stdout.read()
    assert done.wait(timeout=900) == 0, "\n".join(line for _, line in stamped)
    reader.join()
    times = [t for t, _ in stamped]
    gaps = [b - a for a, b in zip([0.0, *times], [*times, time.monotonic() - start])]
    text = "\n".join(f"{t:6.1f} {line}" for t, line in stamped)
    assert stamped and times[0] <= 10, text
    assert max(gaps) <= 30, text
    for name in ("onboard progress-gen", "load the generator and the data", "train the latent search's encoder",
                 "fit the reconstruction detector", "evaluate on the held-out sets", "log the run and register"):
        assert any(line.startswith(name) and ": started" in line for _, line in stamped), (name, text)
        assert any(line.startswith(name) and ": done (" in line for _, line in stamped), (name, text)
    assert "registered progress-gen version 1" in out
    assert "already exists. Creating a new version" not in text + out
