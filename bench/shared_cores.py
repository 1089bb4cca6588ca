"""Onboarding beside another CPU-bound process: how much longer it takes than on idle cores.

The demo's generator (32x32 grey, latent 64, the shipped weights) is onboarded by the
``flipad onboard`` command, in a subprocess, from ``--real`` Fashion-MNIST PNGs, with the
defaults (``--onboard-args`` adds options, for a quicker check than the bar). It runs three
times: on idle cores; beside one competing CPU-bound process (a Python busy loop, one thread);
and, with ``--baseline``, beside the same competitor under OpenMP's spinning wait policy
(``OMP_WAIT_POLICY=ACTIVE``, what torch did before :mod:`flipad.cpu`). Prints per run the wall
seconds, the CPU seconds the onboarding burned, its slowest stages (from its progress lines), and
the ratio of each shared run to the idle one (issue 32's bar: at most 2.5x).
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flipad.io.data import encode_item
from flows.datasets import load_fashion_mnist
from flows.demo import DEMO_GENERATOR, demo_generator

from .common import stage_seconds
from .report import Benchmark, markdown_table

BAR = 2.5  # shared / idle onboarding time
COMPETITOR = [sys.executable, "-c", "while True: pass"]


def onboard(command: list[str], cwd: Path, env: dict, competitor: bool) -> dict:
    """One ``flipad onboard`` run: wall and CPU seconds, its stages' seconds and the last lines it printed."""
    print("$ " + shlex.join(command) + ("   # beside a busy loop" if competitor else ""), flush=True)
    hog = subprocess.Popen(COMPETITOR) if competitor else None
    try:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"flipad onboard failed ({done.returncode}); its last output is above")
    # the stages, not the whole run ("onboard NAME")
    stages = {name: s for name, s in stage_seconds(done.stderr).items() if not name.startswith("onboard ")}
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "stages": stages, "output": "\n".join(done.stdout.strip().splitlines()[-8:])}


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench shared_cores", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=int, default=2000, help="real PNGs given to --real")
    parser.add_argument("--onboard-args", default="", help="extra `flipad onboard` options (not the bar's defaults)")
    parser.add_argument("--baseline", action="store_true", help="also run beside the competitor with spinning threads")
    parser.add_argument("--work", type=Path, help="default: a new temporary folder")
    args = parser.parse_args(argv)
    work = (args.work or Path(tempfile.mkdtemp(prefix="flipad-shared-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    real = load_fashion_mnist("train", 32, limit=args.real)
    real_dir = work / "real"
    real_dir.mkdir(exist_ok=True)
    for i, image in enumerate(real):
        (real_dir / f"{i:05d}.png").write_bytes(encode_item(image))
    _, weights = demo_generator(work / "generator", 0, 1000, real, "cpu")
    base_env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MLFLOW_TRACKING_URI")}
    base_env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true")
    options = [x for k, v in DEMO_GENERATOR.items() for x in ("--option", f"{k}={v}")]
    runs = {"idle": ({}, False), "beside a busy loop": ({}, True)}
    if args.baseline:
        runs["beside a busy loop, spinning threads"] = ({"OMP_WAIT_POLICY": "ACTIVE"}, True)
    figures: dict[str, dict] = {}
    for label, (extra_env, competitor) in runs.items():
        folder = work / label.replace(" ", "-").replace(",", "")
        folder.mkdir(exist_ok=True)
        env = {**base_env, **extra_env, "PREFECT_HOME": str(folder / "prefect")}
        command = [sys.executable, "-m", "flows.cli", "onboard", "shared-cores", "--generator", "dcgan", *options,
                   "--weights", str(weights), "--latent-shape", "64,1,1", "--real", str(real_dir),
                   *shlex.split(args.onboard_args)]
        figures[label] = onboard(command, folder, env, competitor)
        print(f"{label}: {figures[label]['wall_s']:.0f} s wall, {figures[label]['cpu_s']:.0f} s CPU", flush=True)
    idle = figures["idle"]["wall_s"]
    rows = [{"run": label, "wall s": f["wall_s"], "CPU s": f["cpu_s"], "x idle": f["wall_s"] / idle,
             "slowest stages": ", ".join(f"{name} {s:.0f} s" for name, s in
                                        sorted(f["stages"].items(), key=lambda kv: -kv[1])[:3])}
            for label, f in figures.items()]
    ratio = figures["beside a busy loop"]["wall_s"] / idle
    print(markdown_table(rows, formats={"wall s": ".0f", "CPU s": ".0f", "x idle": ".2f"}))
    print(f"beside one busy process: {ratio:.2f}x the idle time (bar <= {BAR}): {'met' if ratio <= BAR else 'NOT met'}")
    return {"runs": rows, "ratio": ratio, "bar_met": ratio <= BAR, "real": args.real, "onboard_args": args.onboard_args}


def render(figures: dict) -> str:
    extra = f" plus `{figures['onboard_args']}`" if figures["onboard_args"] else ""
    return "\n".join([
        f"`flipad onboard` of the demo generator with the defaults{extra}, from {figures['real']} real PNGs, on two "
        f"cores. Beside one busy process it took {figures['ratio']:.2f}x its idle time (bar <= {BAR}: "
        f"{'met' if figures['bar_met'] else 'NOT met'}).", "",
        markdown_table(figures["runs"], formats={"wall s": ".0f", "CPU s": ".0f", "x idle": ".2f"})])


def headline(figures: dict) -> list[str]:
    return [f"onboarding beside one busy process: {figures['ratio']:.2f}x its idle time (bar <= {BAR})"]


BENCHMARK = Benchmark("shared_cores", __doc__, run, render, headline,
                      quick=("--real", "60",
                             "--onboard-args=--num-samples 40 --num-validation 20 --num-test 10 --challenger-steps 0 "
                             "--set reconstruction.encoder_steps=20 --set reconstruction.n_perturbed=20"))
