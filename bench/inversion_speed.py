"""Inversion speed at equal quality: flipad's solvers against the paper's, same images, same run.

Every solver starts at the anchor and solves the same anchored lasso (alpha 5e-4) for the same
8-bit samples of a 32x32 Fashion-MNIST DCGAN (latent 64, final ConvTranspose2d + tanh; trained
here and cached under .flipad/bench unless --weights is given):

- ``paper``: the paper's FISTA (fixed step 0.025, stop when the batch maximum of the mean
  |change| < 1e-5, cap 10,000), all samples in one batch;
- ``invert() default``: ``adapter.invert(images, alpha=5e-4)`` as a user calls it (on the CPU the
  interior-point method, certified duality gap 1e-4);
- ``fista``: flipad's FISTA with its defaults (1/L step, continuation, per-sample stopping).

The optimum P* per sample is the best objective any run reached, a reference run of the
interior-point method to a certified gap of 1e-9 included; the relative objective gap is
(P - P*) / P*. Prints each solver's median and 90% gap, median iterations (Newton steps for the
interior-point method), wall time, and the speed-up over the paper's solver, then whether the
issue's bar holds (median gap no worse than the paper's in at least 5x less time).
"""

from __future__ import annotations

import argparse
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flipad import GeneratorAdapter, LassoOptions
from flipad.generators.architectures import DCGANGenerator
from flipad.inversion.lasso import lasso_objective, solve_lasso
from flows.datasets import load_fashion_mnist
from flows.demo import DEMO_GENERATOR, demo_generator

from .common import timed
from .report import Benchmark, markdown_table


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench inversion_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=5e-4)
    parser.add_argument("--weights", type=Path, help="safetensors of a DCGANGenerator(latent 64, 1x32x32, width 32)")
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.weights:
        from safetensors.torch import load_file

        generator = DCGANGenerator(**DEMO_GENERATOR)
        generator.load_state_dict(load_file(str(args.weights)))
    else:
        real = load_fashion_mnist("train", 32, limit=20_000)
        generator, _ = demo_generator(Path(".flipad/bench"), 0, args.train_steps, real, "cpu")
    adapter = GeneratorAdapter.from_module(generator, device="cpu")
    comparison = compare_solvers(adapter, adapter.generate(args.samples, seed=4242), args.alpha)
    rows, reference_s = comparison.rows, comparison.reference_s
    op = adapter.linear_map
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"problem: {args.samples} 8-bit samples, {op.num_inputs} unknowns, {op.num_outputs} outputs, alpha {args.alpha:g}")
    print(f"reference optimum: interior-point method to a certified gap of 1e-9, {reference_s:.1f} s")
    print(f"{'solver':18s} {'median gap':>11s} {'p90 gap':>9s} {'median iters':>12s} {'wall s':>8s} {'speed-up':>8s}")
    for row in rows:
        print(f"{row.solver:18s} {row.median_gap:11.3e} {row.p90_gap:9.2e} {row.median_iterations:12.0f} "
              f"{row.seconds:8.2f} {row.speed_up:7.2f}x")
    ours, paper = rows[1], rows[0]
    holds = ours.median_gap <= paper.median_gap and ours.speed_up >= 5
    print(f"bar (median gap <= paper's, >= 5x faster): {'met' if holds else 'NOT met'} ({ours.speed_up:.1f}x)")
    return {"samples": args.samples, "unknowns": op.num_inputs, "outputs": op.num_outputs, "alpha": args.alpha,
            "threads": torch.get_num_threads(), "reference_s": reference_s, "rows": [asdict(r) for r in rows],
            "bar_met": holds}


def render(figures: dict) -> str:
    return (f"{figures['samples']} 8-bit samples, {figures['unknowns']} unknowns, {figures['outputs']} outputs, alpha "
            f"{figures['alpha']:g}, {figures['threads']} threads; the reference optimum (interior point to a certified "
            f"gap of 1e-9) took {figures['reference_s']:.1f} s. Bar (median gap no worse than the paper's solver's in "
            f"at least 5x less time): {'met' if figures['bar_met'] else 'NOT met'}.\n\n"
            + markdown_table(figures["rows"], formats={"median_gap": ".2e", "p90_gap": ".2e", "median_iterations": ".0f",
                                                       "seconds": ".2f", "speed_up": ".2f"}))


def headline(figures: dict) -> list[str]:
    ours = figures["rows"][1]
    return [f"FLIPAD's inversion as users call it: {ours['speed_up']:.1f}x faster than the paper's solver, median "
            f"gap {ours['median_gap']:.1e}"]


@dataclass(frozen=True)
class SolverRow:
    solver: str
    median_gap: float
    p90_gap: float
    median_iterations: float
    seconds: float
    speed_up: float  # the paper's solver's wall time / this one's


@dataclass(frozen=True)
class SolverComparison:
    rows: list[SolverRow]  # the paper's solver first, then invert()'s default, then flipad's FISTA
    reference_s: float  # the interior-point reference run to a certified gap of 1e-9
    optimum: torch.Tensor  # per sample, the best objective any run reached


@dataclass(frozen=True)
class ConvergencePoint:
    solver: str
    budget: int  # iterations (Newton steps for the interior-point method)
    seconds: float
    median_gap: float


CONVERGENCE_BUDGETS = {
    "paper": (100, 300, 1000, 3000, 10000),
    "fista": (100, 300, 1000, 3000),
    "interior": (2, 4, 8, 16, 32),
}


def _relative_gaps(op, target, result, alpha: float, optimum: torch.Tensor) -> torch.Tensor:
    check = lasso_objective(op, target, result.deviations, alpha)
    assert torch.allclose(check, result.objective, rtol=1e-4), "objective bookkeeping is inconsistent"
    return (result.objective - optimum) / optimum


def compare_solvers(adapter: GeneratorAdapter, images, alpha: float = 5e-4) -> SolverComparison:
    """The paper's FISTA, ``adapter.invert`` with its defaults and flipad's FISTA on the same
    images, one after the other; gaps against the best objective any run (a reference run of the
    interior-point method to a certified gap of 1e-9 included) reached."""
    target = adapter.residual_target(images)
    op = adapter.linear_map
    runs = {
        "paper": timed(solve_lasso, op, target, alpha, LassoOptions.paper(batch_size=len(images))),
        "invert() default": timed(adapter.invert, images, alpha=alpha, return_result=True),
        "fista": timed(solve_lasso, op, target, alpha, LassoOptions(method="fista")),
    }
    reference, reference_s = timed(solve_lasso, op, target, alpha, LassoOptions(method="interior", gap_tol=1e-9))
    optimum = torch.stack([reference.objective, *(r.objective for r, _ in runs.values())]).min(0).values
    paper_s = runs["paper"][1]
    rows = []
    for name, (result, seconds) in runs.items():
        gap = _relative_gaps(op, target, result, alpha, optimum)
        rows.append(SolverRow(name, gap.median().item(), gap.quantile(0.9).item(),
                              result.iterations.float().median().item(), seconds, paper_s / seconds))
    return SolverComparison(rows, reference_s, optimum)


def convergence_curves(adapter: GeneratorAdapter, images, optimum: torch.Tensor, alpha: float = 5e-4) -> list[ConvergencePoint]:
    """Median relative gap against wall time: each solver rerun with its iteration cap at each of
    ``CONVERGENCE_BUDGETS`` and its stopping rule switched off, on the images ``optimum`` is for."""
    target = adapter.residual_target(images)
    op = adapter.linear_map
    options = {
        "paper": lambda b: LassoOptions.paper(batch_size=len(images), max_iter=b, tol=1e-30),
        "fista": lambda b: LassoOptions(method="fista", max_iter=b, tol=1e-30),
        "interior": lambda b: LassoOptions(method="interior", max_newton=b, gap_tol=1e-30),
    }
    points = []
    for solver, budgets in CONVERGENCE_BUDGETS.items():
        for budget in budgets:
            result, seconds = timed(solve_lasso, op, target, alpha, options[solver](budget))
            gap = _relative_gaps(op, target, result, alpha, optimum).clamp_min(0.0)
            points.append(ConvergencePoint(solver, budget, seconds, gap.median().item()))
    return points


BENCHMARK = Benchmark("inversion_speed", __doc__, run, render, headline,
                      quick=("--samples", "8", "--train-steps", "30"))
