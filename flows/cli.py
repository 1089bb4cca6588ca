"""The ``flipad`` command. Heavy imports happen inside commands so ``flipad --help`` stays instant."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Was this made by my generator? (FLIPAD)")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def demo(
    workdir: Path = typer.Option(Path(".flipad/demo"), help="Where the demo keeps its generator and detector."),
    num_samples: int = typer.Option(2000, help="Generator samples and real images to train the detector on."),
    num_test: int = typer.Option(1000, help="Held-out images per source."),
    train_steps: int = typer.Option(1500, help="GAN training steps for the demo generator."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> None:
    """The whole story on Fashion-MNIST: train a small generator, fit its detector, evaluate it."""
    from flows.demo import run_demo

    report = run_demo(workdir, num_samples=num_samples, num_test=num_test, train_steps=train_steps, device=device)
    typer.echo(report)


if __name__ == "__main__":
    app()
