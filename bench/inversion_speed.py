"""Inversion speed at equal quality: flipad's solver against the paper's, same images, same run.

    python bench/inversion_speed.py [--samples 100] [--weights G.safetensors] [--tol 1e-6 ...]

Both solvers start at the anchor and solve the same anchored lasso (alpha 5e-4) for the same
8-bit samples of a 32x32 Fashion-MNIST DCGAN (latent 64, final ConvTranspose2d + tanh; trained
here and cached under .flipad/bench unless --weights is given). The exact optimum P* per sample
comes from a long reference run; the relative objective gap is (P - P*) / P*. Prints both
solvers' median gap, iterations and wall time, and the time ratio.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flipad import GeneratorAdapter, LassoOptions  # noqa: E402
from flipad.architectures import DCGANGenerator  # noqa: E402
from flipad.data import load_fashion_mnist  # noqa: E402
from flipad.inversion import lasso_objective, solve_lasso  # noqa: E402
from flows.demo import DEMO_GENERATOR, demo_generator  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=5e-4)
    parser.add_argument("--weights", type=Path, help="safetensors of a DCGANGenerator(latent 64, 1x32x32, width 32)")
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--tol", type=float, nargs="*", default=[LassoOptions().tol])
    parser.add_argument("--reference-iters", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.weights:
        from safetensors.torch import load_file

        generator = DCGANGenerator(**DEMO_GENERATOR)
        generator.load_state_dict(load_file(str(args.weights)))
    else:
        real = load_fashion_mnist("train", 32, limit=20_000)
        generator = demo_generator(Path(".flipad/bench"), 0, args.train_steps, real, "cpu")
    adapter = GeneratorAdapter.from_module(generator, device="cpu")
    images = adapter.generate(args.samples, seed=4242)
    target = adapter.residual_target(images)
    op, alpha = adapter.linear_map, args.alpha

    runs = {}
    runs["paper"] = timed(lambda: solve_lasso(op, target, alpha, LassoOptions.paper(batch_size=args.samples)))
    for tol in args.tol:
        runs[f"flipad tol={tol:g}"] = timed(lambda: solve_lasso(op, target, alpha, LassoOptions(tol=tol)))
    reference, ref_s = timed(
        lambda: solve_lasso(op, target, alpha, LassoOptions(tol=1e-12, max_iter=args.reference_iters))
    )
    optimum = torch.minimum(reference.objective, torch.stack([r.objective for r, _ in runs.values()]).min(0).values)

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"problem: {args.samples} 8-bit samples, {op.num_inputs} unknowns, {op.num_outputs} outputs, alpha {alpha:g}")
    print(f"reference optimum: {args.reference_iters} iterations max, {ref_s:.1f} s")
    print(f"{'solver':22s} {'median gap':>11s} {'p90 gap':>9s} {'median iters':>12s} {'wall s':>8s} {'speed-up':>8s}")
    paper_s = runs["paper"][1]
    for name, (result, seconds) in runs.items():
        gap = (result.objective - optimum) / optimum
        check = lasso_objective(op, target, result.deviations, alpha)
        assert torch.allclose(check, result.objective, rtol=1e-4), "objective bookkeeping is inconsistent"
        print(
            f"{name:22s} {gap.median().item():11.3e} {gap.quantile(0.9).item():9.2e} "
            f"{result.iterations.float().median().item():12.0f} {seconds:8.2f} {paper_s / seconds:7.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
