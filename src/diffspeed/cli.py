"""Command line: ``diffspeed generate | bench | demo | methods | train | calibrate | quantize | plan-bits | sweep``.

User errors (bad model name, bad option values, unwritable outputs, invalid recipes) exit with code 2
and one line on stderr; nothing is written. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .errors import DiffspeedError

app = typer.Typer(
    help="diffspeed: make diffusion transformers fast and small, with measured quality.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
DTYPES = ("float32", "bfloat16", "float16")


def _torch_setup(device: str, dtype: str):  # noqa: ANN202
    import torch

    if dtype not in DTYPES:
        raise DiffspeedError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DiffspeedError(f"--device {device} requested but no CUDA GPU is available; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda") and device != "mps":
        raise DiffspeedError(f"--device must be cpu, cuda[:N] or mps, got {device!r}")
    return torch.device(device), getattr(torch, dtype)


def _check_common(steps: int, guidance: float, num: int | None = None) -> None:
    if steps <= 0:
        raise DiffspeedError(f"--steps must be a positive integer, got {steps}")
    if guidance < 0:
        raise DiffspeedError(f"--guidance must be >= 0, got {guidance}")
    if num is not None and num <= 0:
        raise DiffspeedError(f"--num must be a positive integer, got {num}")


def _load(model: str, device, dtype):  # noqa: ANN001, ANN202
    from .models.loading import load_model

    return load_model(model, device=device, dtype=dtype)


def _labels(loaded, labels: list[str] | None, n: int) -> list[int]:  # noqa: ANN001
    names = loaded.class_names
    if not labels:
        k = loaded.num_classes or n
        return [i % k for i in range(n)]
    out = []
    for lab in labels:
        if lab.lstrip("-").isdigit():
            idx = int(lab)
            if names is not None and not 0 <= idx < len(names):
                raise DiffspeedError(f"class label {idx} is out of range; valid: 0..{len(names) - 1} ({', '.join(names)})")
        elif names is not None and lab in names:
            idx = names.index(lab)
        else:
            valid = ", ".join(names) if names else "integers"
            raise DiffspeedError(f"unknown class label {lab!r}; valid labels: {valid}")
        out.append(idx)
    if len(out) < n:
        out = [out[i % len(out)] for i in range(n)]
    return out[:n]


def _recipes(paths: list[str] | None):  # noqa: ANN202
    from .recipe import Recipe

    return [Recipe.from_json(p) for p in (paths or [])]


@app.command()
def generate(
    model: str = typer.Option("reference-image", help="model name (see `diffspeed models`), local diffusers dir or hub id"),
    out: Path = typer.Option(Path("out/sample.png"), help="output file: .png for images, .gif/.mp4 for video"),
    label: Optional[List[str]] = typer.Option(None, "--label", "-l", help="class id or name (repeatable)"),
    num: int = typer.Option(8, "--num", "-n", help="number of samples"),
    seed: int = typer.Option(0, help="seed of the first sample; sample i uses seed + i"),
    steps: int = typer.Option(25, help="denoising steps"),
    guidance: float = typer.Option(4.0, help="classifier-free guidance scale (<= 1 disables CFG)"),
    recipe: Optional[str] = typer.Option(None, help="recipe JSON file (or inline JSON) of methods to apply"),
    cfg_mode: str = typer.Option("batched", help="batched | separate"),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
) -> None:
    """Generate samples (image grid PNG, or video GIF/MP4)."""
    _check_common(steps, guidance, num)
    from .media import IMAGE_SUFFIXES, VIDEO_SUFFIXES, check_writable

    check_writable(out, IMAGE_SUFFIXES + VIDEO_SUFFIXES)
    recipes = _recipes([recipe] if recipe else None)
    dev, dt = _torch_setup(device, dtype)
    from .distributed import finish_from_env, generate_distributed, init_from_env

    rank, world, dev = init_from_env(dev)  # under torchrun: the samples are split over the ranks
    loaded = _load(model, dev, dt)
    if loaded.is_video and out.suffix.lower() not in VIDEO_SUFFIXES:
        raise DiffspeedError(f"{model} is a video model: use a .gif or .mp4 output, not {out.suffix}")
    if not loaded.is_video and out.suffix.lower() not in IMAGE_SUFFIXES:
        raise DiffspeedError(f"{model} is an image model: use a .png output, not {out.suffix}")
    labels = _labels(loaded, label, num)
    from .recipe import apply_recipe
    from .sampler import generate as gen

    handle = apply_recipe(loaded.transformer, recipes[0]) if recipes else None
    t0 = time.perf_counter()
    sample_kwargs = dict(num_steps=steps, guidance_scale=guidance, cfg_mode=cfg_mode)
    if world > 1:
        pixels = generate_distributed(loaded, labels, [seed + i for i in range(num)], progress=rank == 0, **sample_kwargs)
    else:
        pixels = gen(loaded, labels, [seed + i for i in range(num)], progress=True, **sample_kwargs)
    elapsed = time.perf_counter() - t0
    if handle is not None:
        stats = handle.stats
        if not any(c.in_place for c in recipes[0].methods):  # in-place methods (ptq_, quantize_) cannot be undone;
            handle.remove()  # the model is discarded anyway
    from .media import save_image_grid, save_video

    if pixels is not None:  # under torchrun only rank 0 holds the gathered batch and writes it
        if loaded.is_video:
            save_video(pixels, out)
        else:
            save_image_grid(pixels, out, scale=2)
    finish_from_env(world)
    if pixels is None:
        return
    console.print(f"wrote {out} ({num} samples, {steps} steps, {elapsed:.2f} s"
                  + (f", {world} ranks)" if world > 1 else ")"))
    if handle is not None and any(stats.values()):
        console.print(f"method stats: {stats}")


@app.command()
def bench(
    model: str = typer.Option("reference-image", help="model name, local diffusers dir or hub id"),
    recipe: Optional[List[str]] = typer.Option(None, "--recipe", "-r", help="recipe JSON (repeatable); the full model is always measured first"),
    steps: int = typer.Option(25),
    num: int = typer.Option(4, "--num", "-n", help="samples per generation (one seed each)"),
    seed: int = typer.Option(0),
    guidance: float = typer.Option(4.0),
    cfg_mode: str = typer.Option("batched"),
    repeats: int = typer.Option(3, help="timed repeats (median reported)"),
    warmup: int = typer.Option(1),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write one JSON object per recipe here"),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
) -> None:
    """Measure recipes against the full model: latency, speedup, PSNR/SSIM, memory, judge accuracy."""
    _check_common(steps, guidance, num)
    if repeats <= 0:
        raise DiffspeedError(f"--repeats must be positive, got {repeats}")
    if json_path is not None:
        from .media import check_writable

        check_writable(json_path, (".json",))
    from .recipe import Recipe

    recipes = [Recipe()] + _recipes(recipe)
    dev, dt = _torch_setup(device, dtype)
    from .distributed import bench_distributed, finish_from_env, init_from_env

    rank, world, dev = init_from_env(dev)  # under torchrun: each rank measures its shard of the samples
    if world > 1 and num % world:
        raise DiffspeedError(f"--num {num} cannot be split evenly over {world} ranks; use a multiple of {world}")
    loaded = _load(model, dev, dt)
    from .bench.runner import print_table, run_bench, write_json

    labels = _labels(loaded, None, num)
    kwargs = dict(num_steps=steps, guidance_scale=guidance, cfg_mode=cfg_mode, warmup=warmup, repeats=repeats)
    seeds = [seed + i for i in range(num)]
    if world > 1:
        rows = bench_distributed(loaded, recipes, seeds, labels, **kwargs)
        finish_from_env(world)
        if rows is None:
            return
    else:
        rows = run_bench(loaded, recipes, seeds=seeds, labels=labels, **kwargs)
    print_table(rows)
    if json_path is not None:
        write_json(rows, json_path)
        console.print(f"wrote {json_path}")


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo.png"), help="image grid: top rows full model, bottom rows with the recipe"),
    steps: int = typer.Option(25),
    num: int = typer.Option(8),
    json_path: Optional[Path] = typer.Option(Path("out/demo_bench.json"), "--json"),
) -> None:
    """Generate with the shipped reference model, full and accelerated; write a grid and a bench table."""
    from .demo import run_demo

    _check_common(steps, 0.0, num)
    run_demo(out=out, steps=steps, num=num, json_path=json_path, console=console)


@app.command()
def methods() -> None:
    """List the available methods and their options."""
    import dataclasses

    from rich.table import Table

    from .methods import config_class, method_names

    table = Table(title="diffspeed methods")
    table.add_column("method")
    table.add_column("stage")
    table.add_column("options (default)")
    table.add_column("reversible")
    for name in method_names():
        cls = config_class(name)
        opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls))
        table.add_row(name, cls.stage.name.lower(), opts, "no (in place)" if cls.in_place else "yes")
    Console().print(table)


@app.command()
def models() -> None:
    """List built-in model names."""
    from .models.reference import REFERENCE_NAMES
    from .models.zoo import zoo_names

    for name in list(REFERENCE_NAMES) + list(zoo_names()):
        print(name)


def _mount_train() -> None:
    try:
        from .train.cli import app as train_app
    except ImportError:  # pragma: no cover - training module missing in a trimmed install
        return
    app.add_typer(train_app, name="train", help="Train the reference models and judges (CPU smoke or GPU).")


def _mount_calibrate() -> None:
    try:
        from .calibrate import app as calibrate_app
    except ImportError:  # pragma: no cover
        calibrate_app = None
    if calibrate_app is not None:
        app.add_typer(calibrate_app, name="calibrate",
                      help="Offline calibration: erta (ERTACache schedules), activations (static w8a8 scales / "
                           "SmoothQuant), compensation (quantization error-compensation tables).")
    from .quant_cli import register

    register(app, calibrate_app)


def _mount_gates() -> None:
    try:
        from .train.lazy_gates import app as gates_app
    except ImportError:  # pragma: no cover
        return
    app.add_typer(gates_app, name="train-gates", help="Train LazyDiT skip gates against the full model.")


_mount_train()
_mount_calibrate()
_mount_gates()


def main() -> None:
    try:
        app()
    except DiffspeedError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
