"""The stream-fault bar, measured with the installed ``flipad`` command as an operator runs it.

On a detector onboarded with small settings (FLIPAD, a seeded DCGAN 32x32 grayscale; the faults
under test do not depend on the detector's quality) in a real MLflow server subprocess:

1. **Odd folder**: about 230 malformed, oversized, odd-named, odd-format and symlinked items plus
   valid ones; one ``flipad attribute`` run. Prints the exit code, rows per regular file, error
   rows and attributions among the malformed items, valid odd items scored, rows from outside.
2. **Overlapping runs**: two ``flipad attribute`` processes on one output, started 1 s apart
   while new files keep arriving, then a third after the arrivals stop. Prints duplicate rows
   and missing items.
3. **Random kills**: the time T of one uninterrupted run over ``--kill-items`` items, then
   ``--kills`` runs killed (SIGKILL to the process group) at a uniformly random time in
   [T/2, T]. Prints the committed share of each and how many kept at least a third.
4. **Lost tracking server**: an onboarding whose server is killed (by PID) once its run exists,
   half-way through, and while its version is pending; the server restarts on the same store
   and one more onboarding follows. Prints the versions without an alias and the runs RUNNING
   before and after that onboarding, and the lines each failed command printed on stderr.

``--parts`` picks the measurements.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

from flows.processes import free_port, spawn, stop, wait_http

from .odd_items import odd_valid_items, poison_items
from .report import Benchmark

BIN = Path(sys.executable).parent
MODEL = "faults-bench"


def flipad(*args: str, env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "flipad"), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kwargs)


def mlflow_server(root: Path, port: int):
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    handle = spawn(f"mlflow-{port}", cmd, root / f"mlflow-{port}.log",
                   {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"})
    wait_http(f"http://127.0.0.1:{port}/health", 120, handle)
    return handle


def onboard_args(name: str, weights: Path, real: Path) -> list[str]:
    return ["onboard", name, "--generator", "dcgan", "--weights", str(weights), "--option", "latent_dim=64",
            "--option", "channels=1", "--option", "image_size=32", "--option", "width=16", "--latent-shape", "64,1,1",
            "--real", str(real), "--num-samples", "150", "--num-validation", "100", "--num-test", "60",
            "--set", "flipad.epochs=4", "--detector", "flipad", "--no-open-world"]


def read_rows(output: Path) -> pd.DataFrame:
    return pd.read_csv(output, keep_default_na=False, dtype=str) if output.exists() else pd.DataFrame(columns=["uri"])


def committed(output: Path) -> int:
    parts = list(output.with_name(output.name + ".parts").glob("part-*.parquet"))
    return sum(len(pd.read_parquet(p)) for p in parts)


def odd_folder(work: Path, own: np.ndarray, real: np.ndarray, env: dict) -> list[str]:
    folder = work / "odd"
    (folder / "ok").mkdir(parents=True)
    bad = folder / "bad"
    bad.mkdir()
    malformed = 0
    for copy in range(14):  # 15 kinds x 14 variants
        for name, data in poison_items(seed=copy).items():
            (bad / f"{copy:02d}-{name}").write_bytes(data)
            malformed += 1
    odd = odd_valid_items(own)
    for name, data in odd.items():
        (folder / "ok" / name).write_bytes(data)
    from flipad.io.data import encode_item

    for i, image in enumerate([*own[6:26], *real[:20]]):
        (folder / "ok" / f"plain-{i:03d}.png").write_bytes(encode_item(image))
    outside = work / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(encode_item(own[0]))
    links = {"passwd.png": "/etc/passwd", "outside.png": str(outside / "secret.png"), "dir-link": str(outside),
             "loop": str(folder), "dangling.png": str(work / "nowhere.png")}
    for i in range(3):
        for name, target in links.items():
            os.symlink(target, folder / f"link{i}-{name}")
    regular = sum(1 for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    output = work / "odd-results.csv"
    start = time.perf_counter()
    proc = flipad("attribute", "--model", MODEL, "--input", str(folder), "--output", str(output), "--batch-size", "64",
                  "--no-monitor", env=env)
    _, err = proc.communicate(timeout=1800)
    rows = read_rows(output)
    bad_rows = rows[rows["uri"].str.contains("/bad/")]
    ok_rows = rows[rows["uri"].str.contains("/ok/")]
    shown = {os.fsencode(n).decode("utf-8", "backslashreplace") for n in odd}  # how a row names each
    odd_scored = int(ok_rows[ok_rows["uri"].map(lambda u: u.rsplit("/", 1)[-1] in shown)]["error"].eq("").sum())
    return [f"[odd folder] {regular} regular files ({malformed} malformed, {len(odd)} valid odd-named/format, 40 plain) "
          f"+ {len(links) * 3} symlinks: exit {proc.returncode} in {time.perf_counter() - start:.0f} s; "
          f"{len(rows)} rows, {rows['uri'].nunique()} distinct items (one per regular file: "
          f"{len(rows) == regular == rows['uri'].nunique()}); malformed: {int((bad_rows['error'] != '').sum())}/"
          f"{malformed} error rows, {int((bad_rows['is_generated'] == 'True').sum())} attributed; valid ok items "
          f"scored {int((ok_rows['error'] == '').sum())}/{len(ok_rows)} (odd ones {odd_scored}/{len(odd)}); rows from "
          f"outside the folder {int((~rows['uri'].str.startswith(str(folder))).sum())}; stderr lines "
          f"{len(err.strip().splitlines())}"]


def overlapping(work: Path, images: np.ndarray, env: dict) -> list[str]:
    from flipad.io.data import encode_item

    folder = work / "arriving"
    folder.mkdir()
    for i in range(100):
        (folder / f"{i:04d}.png").write_bytes(encode_item(images[i]))
    output = work / "overlap.csv"

    def arrive() -> None:
        for i in range(100, len(images)):
            (folder / f"{i:04d}.png").write_bytes(encode_item(images[i]))
            time.sleep(0.1)

    feeder = threading.Thread(target=arrive)
    feeder.start()
    args = ("attribute", "--model", MODEL, "--input", str(folder), "--output", str(output), "--batch-size", "16",
            "--no-monitor")
    first = flipad(*args, env=env)
    time.sleep(1.0)
    second = flipad(*args, env=env)
    done = [p.communicate(timeout=1800) for p in (first, second)]
    feeder.join()
    third = flipad(*args, env=env)
    done.append(third.communicate(timeout=1800))
    codes = [p.returncode for p in (first, second, third)]
    failures = [err.strip().splitlines()[-1][:200] for (_, err), code in zip(done, codes) if code and err.strip()]
    rows = read_rows(output)
    present = set(rows["uri"])
    missing = sum(1 for p in folder.iterdir() if str(p) not in present)
    return [f"[overlapping runs] {len(images)} items (100 before, {len(images) - 100} arriving during the runs): exit codes "
          f"{codes}; {len(rows)} rows, {int(rows.duplicated(['uri', 'model', 'version']).sum())} duplicates, "
          f"{missing} items missing{'; failed: ' + ' | '.join(failures) if failures else ''}"]


def kills(work: Path, images: np.ndarray, env: dict, count: int, rng: random.Random) -> list[str]:
    from flipad.io.data import encode_item

    folder = work / "kill-input"
    folder.mkdir()
    for i, image in enumerate(images):
        (folder / f"{i:04d}.png").write_bytes(encode_item(image))

    def attribute(output: Path):
        return flipad("attribute", "--model", MODEL, "--input", str(folder), "--output", str(output), "--batch-size",
                      "16", "--no-monitor", env=env)

    start = time.perf_counter()
    full = attribute(work / "kill-full.csv")
    full.communicate(timeout=1800)
    expected = time.perf_counter() - start
    shares = []
    for k in range(count):
        output = work / f"kill-{k}.csv"
        at = rng.uniform(expected / 2, expected)
        proc = attribute(output)
        time.sleep(at)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shares.append(committed(output) / len(images))
    kept = sum(share >= 1 / 3 for share in shares)
    return [f"[random kills] {len(images)} items, uninterrupted run {expected:.1f} s; {count} kills in [T/2, T]: "
          f"committed shares {' '.join(f'{s:.2f}' for s in shares)}; {kept}/{count} kept at least a third "
          f"(min {min(shares):.2f}, median {float(np.median(shares)):.2f})"]


def lost_server(work: Path, weights: Path, real: Path, env: dict) -> list[str]:
    from mlflow.tracking import MlflowClient

    store = work / "lost"
    store.mkdir()
    name = f"{MODEL}-lost"
    errors = []

    def state(client: MlflowClient) -> tuple[int, int]:
        versions = client.search_model_versions(f"name='{name}'") if client.search_registered_models(
            f"name='{name}'") else []
        aliased = set(client.get_registered_model(name).aliases.values()) if versions else set()
        experiment = client.get_experiment_by_name(f"flipad/{name}")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        return (sum(str(v.version) not in aliased for v in versions), sum(r.info.status == "RUNNING" for r in runs))

    for point in ("run exists", "half-way", "version pending"):
        port = free_port()
        server = mlflow_server(store, port)
        url = f"http://127.0.0.1:{port}"
        client = MlflowClient(url)
        run_env = {**env, "MLFLOW_TRACKING_URI": url}  # the command's own retry settings
        start = time.perf_counter()
        proc = flipad(*onboard_args(name, weights, real), env=run_env)
        hit = "finished before the kill point"
        while proc.poll() is None:
            try:
                experiment = client.get_experiment_by_name(f"flipad/{name}")
                running = experiment and [r for r in client.search_runs([experiment.experiment_id])
                                          if r.info.status == "RUNNING"]
                pending = client.search_registered_models(f"name='{name}'") and [
                    v for v in client.search_model_versions(f"name='{name}'")
                    if v.tags.get("flipad.registration") == "pending"]
            except Exception:  # the server is being killed
                running = pending = None
            if ((point == "run exists" and running) or (point == "version pending" and pending)
                    or (point == "half-way" and running and time.perf_counter() - start > 40)):
                stop(server)
                hit = f"killed at '{point}' after {time.perf_counter() - start:.1f} s"
                break
            time.sleep(0.05)
        _, err = proc.communicate(timeout=1800)
        stop(server)
        lines = err.strip().splitlines()
        errors.append((point, hit, proc.returncode, len(lines), " / ".join(line[:160] for line in lines)))
    port = free_port()
    server = mlflow_server(store, port)
    url = f"http://127.0.0.1:{port}"
    before = state(MlflowClient(url))
    proc = flipad(*onboard_args(name, weights, real), env={**env, "MLFLOW_TRACKING_URI": url})
    proc.communicate(timeout=1800)
    after = state(MlflowClient(url))
    stop(server)
    said = [f"[lost server] {point}: {hit}; exit {code}, {count} stderr line(s): {last}"
            for point, hit, code, count, last in errors]
    return [*said, f"[lost server] after the restart: {before[0]} versions without an alias, {before[1]} runs RUNNING; "
                   f"after one more onboarding (exit {proc.returncode}): {after[0]} versions without an alias, "
                   f"{after[1]} runs RUNNING"]


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench stream_faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--kill-items", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default="odd,overlap,kills,server", help="which measurements, comma-separated")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="flipad-faults-"))
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("PREFECT_API_URL", None)
    import torch
    from safetensors.torch import save_file

    from flipad.generators.architectures import DCGANGenerator
    from flipad.generators.sampling import generate_samples
    from flows.datasets import load_fashion_mnist

    torch.manual_seed(args.seed)
    generator = DCGANGenerator(latent_dim=64, channels=1, image_size=32, width=16).eval()
    weights = work / "generator.safetensors"
    save_file(generator.state_dict(), str(weights))
    real = load_fashion_mnist("test", 32, limit=600)
    np.save(work / "real.npy", real[:300])
    own = generate_samples(generator, (64, 1, 1), 400, seed=77, output_range=(-1.0, 1.0))
    parts = set(args.parts.split(","))
    print(f"work folder {work}")
    said: list[str] = []
    if parts & {"odd", "overlap", "kills"}:
        port = free_port()
        server = mlflow_server(work, port)
        env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{port}"
        start = time.perf_counter()
        onboarded = subprocess.run([str(BIN / "flipad"), *onboard_args(MODEL, weights, work / "real.npy")], env=env,
                                   capture_output=True, text=True, timeout=1800)
        if onboarded.returncode != 0:
            stop(server)
            raise SystemExit(f"onboarding failed: {onboarded.stderr[-2000:]}")
        said.append(f"onboarded {MODEL} in {time.perf_counter() - start:.0f} s")
        try:
            if "odd" in parts:
                said += odd_folder(work, own, real[300:], env)
            if "overlap" in parts:
                said += overlapping(work, np.concatenate([own[:120], real[300:420]]), env)
            if "kills" in parts:
                said += kills(work, np.concatenate([own[:args.kill_items // 2], real[:args.kill_items - args.kill_items // 2]]),
                              env, args.kills, random.Random(args.seed))
        finally:
            stop(server)
            env.pop("MLFLOW_TRACKING_URI")
    if "server" in parts:
        said += lost_server(work, weights, work / "real.npy", env)
    for line in said:
        print(line)
    return {"parts": sorted(parts), "kills": args.kills, "kill_items": args.kill_items, "findings": said}


def render(figures: dict) -> str:
    return "\n".join(f"- {line}" for line in figures["findings"])


BENCHMARK = Benchmark("stream_faults", __doc__, run, render,
                      quick=("--parts", "odd"))
