"""``diffspeed train ...`` (also ``python -m diffspeed.train.cli ...``): train and evaluate the
reference models and their judges.

    diffspeed train judge --kind image --device cuda --max-minutes 1
    diffspeed train image --device cuda --batch-size 512 --max-minutes 5
    diffspeed train video --device cuda --batch-size 256 --max-minutes 6
    diffspeed train evaluate --model reference-image --samples 1000 --steps 25 --guidance 4

Weights go to ``--out`` (default: the package's ``weights/`` directory, i.e. what ships).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(name="train", help="Train the reference models and judges; evaluate them.",
                  no_args_is_help=True, add_completion=False)

_DEVICE = typer.Option("auto", help="cuda, cpu or auto (cuda when available)")
_OUT = typer.Option(None, help="weights root directory (default: the package weights dir); writes <out>/<name>/")
_LOGS = typer.Option(None, help="directory for the loss curve PNG and history JSON")
_SEED = typer.Option(0, help="seed of the training data stream and noise")
_COMPILE = typer.Option(False, "--compile/--no-compile",
                        help="torch.compile the training forward (falls back to eager if compiling fails)")
_MAXMIN = typer.Option(None, "--max-minutes", help="time budget; the LR schedule anneals within it and training stops")


def _run(fn, **kwargs):
    from ..errors import DiffspeedError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return fn(**kwargs)
    except DiffspeedError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def _generator_command(name: str, train_fn: str, batch_size_default: int, batch_size_help: str, doc: str) -> None:
    """Register ``diffspeed train <name>``: the reference-generator options, then ``.<name>.<train_fn>(...)``."""

    def command(
        device: str = _DEVICE,
        steps: int = typer.Option(20000, help="maximum optimizer steps"),
        batch_size: int = typer.Option(batch_size_default, help=batch_size_help),
        lr: float = typer.Option(5e-4, help="peak learning rate (AdamW, warmup + cosine)"),
        max_minutes: Optional[float] = _MAXMIN,
        out: Optional[Path] = _OUT,
        seed: int = _SEED,
        log_dir: Optional[Path] = _LOGS,
        compile: bool = _COMPILE,
        init_from: Optional[Path] = typer.Option(None, help="warm start from a saved model folder (video only)"),
    ) -> None:
        train = getattr(importlib.import_module(f".{name}", __package__), train_fn)
        extra = {"init_from": init_from} if init_from is not None else {}
        if extra and name != "video":
            typer.echo("error: --init-from is supported for video only", err=True)
            raise typer.Exit(2)
        _run(train, steps=steps, batch_size=batch_size, lr=lr, max_minutes=max_minutes, out=out, seed=seed,
             device=device, log_dir=log_dir, compile=compile, **extra)

    command.__name__ = name
    command.__doc__ = doc
    app.command(name)(command)


_generator_command("image", "train_image", 256, "samples per step",
                   "Train reference-image (DiT, 12 shape x colour classes).")
_generator_command("video", "train_video", 64, "clips per step",
                   "Train reference-video (Wan, 8 shape x motion classes) with its class-embedding table.")


@app.command()
def judge(
    kind: str = typer.Option("all", help="image, video or all"),
    device: str = _DEVICE,
    steps: int = typer.Option(3000, help="maximum optimizer steps (per judge)"),
    batch_size: int = typer.Option(256, help="samples per step"),
    lr: float = typer.Option(2e-3, help="peak learning rate"),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="time budget per judge"),
    out: Optional[Path] = _OUT,
    seed: int = _SEED,
    log_dir: Optional[Path] = _LOGS,
    heldout: Optional[int] = typer.Option(None, help="held-out real samples to measure accuracy on"),
) -> None:
    """Train the judge classifier(s) and report held-out accuracy."""
    from .judge import train_judge

    kinds = ["image", "video"] if kind == "all" else [kind]
    for k in kinds:
        _run(train_judge, kind=k, steps=steps, batch_size=batch_size, lr=lr, max_minutes=max_minutes, out=out,
             seed=seed, device=device, log_dir=log_dir, heldout=heldout)


@app.command()
def evaluate(
    model: str = typer.Option("reference-image", help="reference-image or reference-video"),
    samples: int = typer.Option(1000, help="generated samples (class-balanced)"),
    steps: int = typer.Option(25, help="Euler steps"),
    guidance: List[float] = typer.Option([4.0], help="CFG scale; repeat the option for several"),
    device: str = _DEVICE,
    out_json: Optional[Path] = typer.Option(None, help="JSON list to merge the result rows into"),
    grid: Optional[Path] = typer.Option(None, help="sample grid PNG (first guidance value)"),
    gif: Optional[Path] = typer.Option(None, help="video only: GIF of generated clips (default: grid path .gif)"),
    weights_dir: Optional[Path] = typer.Option(None, help="weights root (default: the package weights dir)"),
    batch_size: Optional[int] = typer.Option(None, help="samples per sampling batch"),
    seed: int = typer.Option(0, help="noise seed base"),
) -> None:
    """Generate with the sampler, score with the judge (accuracy, Frechet judge distance), write grid/JSON."""
    from .evaluate import evaluate as run_eval

    _run(run_eval, model=model, samples=samples, steps=steps, guidance=guidance, device=device,
         weights_dir=weights_dir, out_json=out_json, grid=grid, gif=gif, batch_size=batch_size, seed=seed)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
