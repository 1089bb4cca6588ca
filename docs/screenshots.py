"""Screenshots of what a reviewer sees in the MLflow UI, taken with a real headless Chromium.

    python docs/screenshots.py                      # the demo's store (./mlflow.db), model fashion-dcgan
    python docs/screenshots.py --tracking-uri http://127.0.0.1:5000 --model NAME

For the registered model, its champion version, and that version's onboarding run (overview,
score histograms, ROC), the script loads the page in ``chromium --headless`` (Debian's package
``chromium``), checks that the page's rendered text holds what a reviewer needs (the worst-source
line and the thresholds of the model card, the promotion reason, the headline metrics), and
writes ``OUT/<page>.png``. A page that does not render fails the script with one line naming it.
A store given as a database URI is served by ``mlflow ui`` on a free loopback port for the run.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

# what Debian's Chromium needs to run headless as root on a machine with a closed network
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


@dataclass(frozen=True)
class Page:
    """One page to capture: its file name, its route in the MLflow UI and the texts it must show."""

    name: str
    route: str
    must_show: tuple[str, ...]
    height: int = 1800


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(tracking_uri: str, timeout_s: float = 120.0):
    """The UI's base URL: ``tracking_uri`` itself when it is a server, else ``mlflow ui`` on it."""
    if tracking_uri.startswith(("http://", "https://")):
        yield tracking_uri.rstrip("/")
        return
    port = _free_port()
    mlflow_ui = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow_ui), "ui", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"error: mlflow ui on {tracking_uri} did not start: "
                                     f"{proc.stderr.read().decode()[-300:] if proc.poll() is not None else 'timed out'}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def pages(tracking_uri: str, model: str) -> list[Page]:
    """The registered model, its champion version and the version's onboarding run."""
    client = MlflowClient(tracking_uri)
    version = client.get_model_version_by_alias(model, "champion")
    run = client.get_run(version.run_id)
    run_route = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    return [
        Page("registered-model", f"#/models/{model}", (model, "champion")),
        Page("model-version", f"#/models/{model}/versions/{version.version}", ("worst source", "Thresholds", "Promotion")),
        Page("onboarding-run", run_route, ("worst_balanced_accuracy", "threshold")),
        Page("score-histograms", f"{run_route}/artifacts/plots/score_histograms.png", ("score_histograms.png",)),
        Page("roc", f"{run_route}/artifacts/plots/roc.png", ("roc.png",)),
    ]


def capture(chromium: str, url: str, out: Path, page: Page, budget_ms: int = 20_000) -> None:
    """Render ``page`` in headless Chromium; fail unless its text shows ``page.must_show``; write the PNG."""
    with tempfile.TemporaryDirectory() as profile:
        common = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size=1400,{page.height}",
                  f"--virtual-time-budget={budget_ms}"]
        target = f"{url}/{page.route}"
        dom = subprocess.run([*common, "--dump-dom", target], capture_output=True, text=True, timeout=180).stdout
        missing = [text for text in page.must_show if text not in dom]
        if missing:
            raise SystemExit(f"error: page {page.name} ({target}) rendered without {missing}")
        shot = out / f"{page.name}.png"
        subprocess.run([*common, f"--screenshot={shot}", target], capture_output=True, timeout=180, check=True)
        if not shot.is_file() or shot.stat().st_size == 0:
            raise SystemExit(f"error: page {page.name} ({target}) gave no screenshot")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=f"sqlite:///{Path.cwd() / 'mlflow.db'}",
                        help="the store (a database URI, served by mlflow ui) or a running server's URL")
    parser.add_argument("--model", default="fashion-dcgan", help="the registered model to show")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "screenshots")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args(argv)
    if not shutil.which(args.chromium):
        raise SystemExit(f"error: --chromium {args.chromium} not found; install Debian's chromium package")
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = pages(args.tracking_uri, args.model)
    with served(args.tracking_uri) as url:
        for page in wanted:
            capture(args.chromium, url, args.out, page)
            print(f"{page.name}: {args.out / (page.name + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
