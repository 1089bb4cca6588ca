"""``flipad onboard`` of the small autoencoder with the defaults: issue 33's verdict bar from the CLI and the card.

The small ``AutoencoderKL`` of ``python -m bench autoencoder`` (trained ``--train-steps`` batches on
photo patches from seed 0, cached under .flipad/bench) is onboarded by the ``flipad onboard``
command, in a subprocess, as ``diffusers:FOLDER``, from ``--real`` photo patches of the test split
written as PNGs, with the defaults (``--onboard-args`` adds options, for a quicker check than the
bar): its own items, re-saves and look-alikes (another seed's autoencoder, the decoder
fine-tuned) are the ones onboarding makes. Prints, from the registered version's run (what its
card shows), the balanced accuracy against each source and the own items attributed after each
re-save, at the first FNR target; and the wall seconds. Issue 33's bar: balanced accuracy at
least 0.99 against real images, the other-seed autoencoder and the fine-tuned decoder; own items
attributed at least 0.97 after JPEG q90 and q80.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

from flipad.io.data import encode_item
from flows.onboard import OWN, source_key
from flows.photos import photo_patches

from .common import SMALL_AUTOENCODER, saved_autoencoder
from .report import Benchmark, markdown_table
from .shared_cores import onboard

MODEL = "ae64"
SOURCES = {"real": "real", "other-seed autoencoder": "lookalike_other-seed-autoencoder",
           "fine-tuned decoder": "lookalike_finetuned-decoder"}
RESAVES = ("jpeg q90", "jpeg q80")
BAR = {"balanced_accuracy": 0.99, "own_attributed": 0.97}


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench autoencoder_onboard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", type=int, default=600, help="batches of 8 patches of the autoencoder")
    parser.add_argument("--real", type=int, default=3000, help="photo patches given to --real")
    parser.add_argument("--onboard-args", default="", help="extra `flipad onboard` options (not the bar's defaults)")
    parser.add_argument("--cache", type=Path, default=Path(".flipad/bench"))
    parser.add_argument("--work", type=Path, help="default: a new temporary folder")
    args = parser.parse_args(argv)
    work = (args.work or Path(tempfile.mkdtemp(prefix="flipad-ae-onboard-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    owner = saved_autoencoder(args.cache.resolve() / f"ae{args.train_steps}-owner", SMALL_AUTOENCODER,
                              photo_patches(64, 4000, seed=0), args.train_steps, seed=0)
    real_dir = work / "real"
    real_dir.mkdir(exist_ok=True)
    for i, image in enumerate(photo_patches(64, args.real, seed=3, split="test")):
        (real_dir / f"{i:05d}.png").write_bytes(encode_item(image))
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PREFECT_HOME": str(work / "prefect"), "MLFLOW_TRACKING_URI": tracking}
    command = [sys.executable, "-m", "flows.cli", "onboard", MODEL, "--generator", f"diffusers:{owner}",
               "--real", str(real_dir), *shlex.split(args.onboard_args)]
    figures = onboard(command, work, env, competitor=False)
    card = _card(tracking)
    print(markdown_table(card["rows"], formats={"value": ".4f"}))
    print(f"{figures['wall_s']:.0f} s wall; bar {'met' if card['bar_met'] else 'NOT met'}")
    print(figures["output"])
    return {"train_steps": args.train_steps, "real": args.real, "onboard_args": args.onboard_args,
            "wall_s": figures["wall_s"], "cpu_s": figures["cpu_s"], "stages": figures["stages"],
            "output": figures["output"], **card}


def _card(tracking: str) -> dict:
    """The registered version's figures at its first FNR target, as its run (and card) hold them."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    version = client.get_model_version(MODEL, "1")
    metrics = client.get_run(version.run_id).data.metrics
    fnr = min(float(k.rsplit("_fnr", 1)[1]) for k in metrics if k.startswith("threshold_fnr"))
    rows = [{"figure": f"balanced accuracy against {name}", "value": metrics[f"balanced_accuracy_{key}_fnr{fnr:g}"],
             "bar": BAR["balanced_accuracy"]} for name, key in SOURCES.items()]
    rows += [{"figure": f"own items attributed after {name}",
              "value": metrics[f"own_accepted_{source_key(f'{OWN} {name}')}_fnr{fnr:g}"], "bar": BAR["own_attributed"]}
             for name in RESAVES]
    return {"fnr": fnr, "rows": rows, "bar_met": all(r["value"] >= r["bar"] for r in rows),
            "card_has_figures": all(key in (version.description or "") for key in SOURCES.values())}


def render(figures: dict) -> str:
    extra = f" plus `{figures['onboard_args']}`" if figures["onboard_args"] else ""
    return "\n".join([
        f"`flipad onboard` of the small autoencoder ({figures['train_steps']} training batches) as "
        f"`diffusers:FOLDER` with the defaults{extra}, from {figures['real']} real photo patches: "
        f"{figures['wall_s']:.0f} s wall, {figures['cpu_s']:.0f} s CPU. The registered version's figures at FNR "
        f"{figures['fnr']:g} (bar {'met' if figures['bar_met'] else 'NOT met'}; the card names every source: "
        f"{'yes' if figures['card_has_figures'] else 'no'}):", "",
        markdown_table(figures["rows"], formats={"value": ".4f"}), "",
        markdown_table([{"stage": k, "seconds": v} for k, v in figures["stages"].items()], formats={"seconds": ".0f"}),
        "", "The command's summary:", "", "```", figures["output"], "```"])


def headline(figures: dict) -> list[str]:
    worst = min(figures["rows"], key=lambda r: r["value"] / r["bar"])
    return [f"`flipad onboard` of the small autoencoder, defaults: worst {worst['figure']} {worst['value']:.3f} "
            f"(bar {worst['bar']}: {'met' if figures['bar_met'] else 'NOT met'}), {figures['wall_s'] / 60:.1f} min"]


BENCHMARK = Benchmark("autoencoder_onboard", __doc__, run, render, headline,
                      quick=("--train-steps", "3", "--real", "150",
                             "--onboard-args=--num-samples 40 --num-validation 20 --num-test 10 --challenger-steps 2 "
                             "--set autoencoder.n_perturbed=20 "
                             "--set autoencoder.encoder_steps=1 --set autoencoder.steps=1"))
