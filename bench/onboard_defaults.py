"""``flipad onboard`` of an RGB DCGAN with the defaults, then ``flipad attribute``: wall time against the budget, and the verdict in the wild.

The paper's DCGAN (latent 100, RGB) at ``--size`` px (64 by default: width 64, trained 600 GAN
steps on photo patches from seed 0, the generator of ``python -m bench generator_sizes``, cached
under .flipad/bench) is saved as safetensors and onboarded by the ``flipad onboard`` command, in
a subprocess, from ``--real`` photo patches written as PNGs, with the defaults
(``--onboard-args`` adds options, for a quicker check than the bar). Prints the wall and CPU
seconds, each stage's seconds, and the version's headline from the command's output. Issue 32's
bar: at most 20 minutes for a 64x64 RGB generator with latent 100 on two cores.

Then one ``flipad attribute`` run scores a folder of ``--items`` items per source and variant (PNG,
JPEG q90, JPEG q80 and q60 with 4:2:0 chroma, PNG of a JPEG q80, lossy WebP q80): new samples of
the owner's generator (a seed onboarding does not draw), of the look-alike (the same architecture
trained from seed 1) and real photo patches from the held-out photos. Prints the share attributed
per folder and issue 32's verdict bar: own items >= 0.97 in every variant but q60, at most 0.03
of the q60 ones called "not generated", the look-alike <= 0.02 and real <= 0.01 in every variant.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from flipad.generators.sampling import generate_samples
from flipad.io.data import encode_item
from flows.demo import source_table, write_broken
from flows.photos import photo_patches

from .common import rgb_dcgan
from .generator_sizes import TRAIN_STEPS, WIDTHS
from .report import Benchmark, markdown_table
from .shared_cores import onboard
from .wild import BAR, TEST_SEED, VARIANTS, bar_met, read_rows, run_command, worst_figures, write_variants

BUDGET_S = {32: 5 * 60, 64: 20 * 60}  # issue 32's onboarding budgets on two cores (32 px: for grey generators)


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench onboard_defaults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, choices=sorted(WIDTHS))
    parser.add_argument("--train-steps", type=int, help="GAN steps (default: generator_sizes' for the size)")
    parser.add_argument("--real", type=int, default=2000, help="photo patches given to --real")
    parser.add_argument("--onboard-args", default="", help="extra `flipad onboard` options (not the bar's defaults)")
    parser.add_argument("--items", type=int, default=200, help="items per source and variant attributed (0: none)")
    parser.add_argument("--work", type=Path, help="default: a new temporary folder")
    args = parser.parse_args(argv)
    work = (args.work or Path(tempfile.mkdtemp(prefix="flipad-onboard-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    size, width = args.size, WIDTHS[args.size]
    steps = args.train_steps or TRAIN_STEPS[size]
    gan_real = photo_patches(size, 4000, seed=0, split="train")
    generator = rgb_dcgan(size, width, steps, 0, gan_real)
    weights = work / "generator.safetensors"
    save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, str(weights))
    real_dir = work / "real"
    real_dir.mkdir(exist_ok=True)
    for i, image in enumerate(photo_patches(size, args.real, seed=2, split="train")):
        (real_dir / f"{i:05d}.png").write_bytes(encode_item(image))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true",
               PREFECT_HOME=str(work / "prefect"))
    options = [x for k, v in dict(latent_dim=100, channels=3, image_size=size, width=width).items()
               for x in ("--option", f"{k}={v}")]
    command = [sys.executable, "-m", "flows.cli", "onboard", f"rgb{size}", "--generator", "dcgan", *options,
               "--weights", str(weights), "--latent-shape", "100,1,1", "--real", str(real_dir),
               *shlex.split(args.onboard_args)]
    figures = onboard(command, work, env, competitor=False)
    budget = BUDGET_S.get(size)
    stages = [{"stage": name, "seconds": s} for name, s in figures["stages"].items()]
    print(markdown_table(stages, formats={"seconds": ".0f"}))
    print(f"{size} px: {figures['wall_s']:.0f} s wall, {figures['cpu_s']:.0f} s CPU"
          + (f" (budget {budget} s: {'met' if figures['wall_s'] <= budget else 'NOT met'})" if budget else ""))
    print(figures["output"])
    wild = attribute(work, env, f"rgb{size}", {"own": generator, "look-alike": rgb_dcgan(size, width, steps, 1, gan_real)},
                     photo_patches(size, args.items, seed=1, split="test")) if args.items else None
    return {"wild": wild, "items": args.items, "size": size, "width": width, "GAN steps": steps, "real": args.real, "onboard_args": args.onboard_args,
            "wall_s": figures["wall_s"], "cpu_s": figures["cpu_s"], "stages": stages, "output": figures["output"],
            "budget_s": budget, "bar_met": budget is not None and figures["wall_s"] <= budget}


def attribute(work: Path, env: dict, model: str, generators: dict, real) -> dict:
    """``flipad attribute`` of ``model`` over each generator's new samples and ``real`` in every
    variant (:func:`bench.wild.write_variants`): the share attributed per folder and the bar's figures."""
    stream = work / "stream"
    for source, module in generators.items():
        write_variants(stream, source, generate_samples(module, (100, 1, 1), len(real), TEST_SEED, (-1.0, 1.0)))
    write_variants(stream, "real", real)
    write_broken(stream, real[0])  # must become one error row
    results = work / "results.csv"
    seconds = run_command([sys.executable, "-m", "flows.cli", "attribute", "--model", model, "--input", str(stream),
                           "--output", str(results)], work, env)
    rows = read_rows(results)
    table = source_table(rows, stream)
    print(table.to_string())
    worst = worst_figures(table["attributed_fraction"], rows, "own", [s for s in generators if s != "own"],
                          [f"real--{v}" for v in VARIANTS])
    met = bar_met(worst)
    print(f"own worst variant {worst['own']:.3f} (bar >= {BAR['own']}), own q60 not generated "
          f"{worst['own q60 not generated']:.3f} (bar <= {BAR['own q60 not generated']}), look-alike worst "
          f"{worst['other']:.3f} (bar <= {BAR['other']}), real worst {worst['real']:.3f} (bar <= {BAR['real']}): "
          f"{'met' if met else 'NOT met'}; {len(rows)} rows in {seconds:.0f} s", flush=True)
    return {"worst": worst, "bar_met": met, "rows": len(rows), "attribute_s": seconds,
            "errors": int(table["errors"].sum()),
            "attributed": {source: float(v) for source, v in table["attributed_fraction"].items() if source != "broken"}}


def render(figures: dict) -> str:
    extra = f" plus `{figures['onboard_args']}`" if figures["onboard_args"] else ""
    budget = figures["budget_s"]
    verdict = (f" (budget {budget / 60:.0f} min: {'met' if figures['bar_met'] else 'NOT met'})" if budget else "")
    lines = [
        f"`flipad onboard` of the {figures['size']}x{figures['size']} RGB DCGAN (width {figures['width']}, "
        f"{figures['GAN steps']} GAN steps) with the defaults{extra}, from {figures['real']} real photo patches: "
        f"{figures['wall_s']:.0f} s wall, {figures['cpu_s']:.0f} s CPU{verdict}.", "",
        markdown_table(figures["stages"], formats={"seconds": ".0f"}), "",
        "The command's summary:", "", "```", figures["output"], "```"]
    wild = figures.get("wild")
    if wild:
        worst = wild["worst"]
        lines += ["", f"`flipad attribute` over {figures['items']} items per source and variant ({wild['rows']} rows, "
                  f"{wild['errors']} error rows, in {wild['attribute_s']:.0f} s): own items attributed {worst['own']:.3f} "
                  f"in the worst variant but q60 (bar >= {BAR['own']}), own JPEG q60 called not generated "
                  f"{worst['own q60 not generated']:.3f} (bar <= {BAR['own q60 not generated']}), the look-alike "
                  f"{worst['other']:.3f} at worst (bar <= {BAR['other']}), real {worst['real']:.3f} at worst (bar <= "
                  f"{BAR['real']}): {'met' if wild['bar_met'] else 'NOT met'}.", "",
                  markdown_table([{"folder": k, "attributed": v} for k, v in wild["attributed"].items()],
                                 formats={"attributed": ".3f"})]
    return "\n".join(lines)


def headline(figures: dict) -> list[str]:
    budget = figures["budget_s"]
    wild = figures.get("wild")
    return [f"`flipad onboard` of a {figures['size']}x{figures['size']} RGB DCGAN: {figures['wall_s'] / 60:.1f} min"
            + (f" (bar <= {budget / 60:.0f} min: {'met' if figures['bar_met'] else 'NOT met'})" if budget else "")
            + (f"; then `flipad attribute`: own >= {wild['worst']['own']:.3f} in every variant but q60, look-alike <= "
               f"{wild['worst']['other']:.3f}, real <= {wild['worst']['real']:.3f} (verdict bar: "
               f"{'met' if wild['bar_met'] else 'NOT met'})" if wild else "")]


BENCHMARK = Benchmark("onboard_defaults", __doc__, run, render, headline,
                      quick=("--size", "32", "--train-steps", "3", "--real", "60", "--items", "5",
                             "--onboard-args=--num-samples 40 --num-validation 20 --num-test 10 --challenger-steps 0 "
                             "--set reconstruction.encoder_steps=20 --set reconstruction.n_perturbed=20"))
