"""Train ``reference-image``: a class-conditional DiT on :mod:`diffspeed.data.shapes` (rectified flow).

Per step: a fresh batch rendered on the device from the seed stream, 10 % of labels replaced by
the null class (classifier-free guidance), ``t`` logit-normal, ``x_t = (1 - t) x_0 + t eps``,
MSE between the prediction at ``timestep = 1000 t`` and ``eps - x_0``. The EMA weights are saved
in fp16 with ``save_pretrained`` to ``<out>/reference-image/``.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..data import shapes
from ..models.reference import build_image_model
from .common import (
    EMA,
    MaybeCompiled,
    TrainResult,
    TrainSettings,
    autocast,
    count_params,
    default_warmup,
    device_name,
    generator_for,
    rand,
    randn,
    sample_flow_t,
    say,
    start_run,
    train_loop,
    weights_folder,
    write_history,
    write_json,
)

NAME = "reference-image"
LABEL_DROPOUT = 0.1


def flow_targets(x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, timestep on the 1000 scale, velocity target eps - x0) for a batch of clean samples."""
    device = x0.device
    t = sample_flow_t(x0.shape[0], gen, device)
    eps = randn(tuple(x0.shape), gen, device)
    tb = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - tb) * x0 + tb * eps, t * 1000.0, eps - x0


def drop_labels(labels: torch.Tensor, null: int, p: float, gen: torch.Generator) -> torch.Tensor:
    keep = rand((labels.shape[0],), gen, labels.device) >= p
    return torch.where(keep, labels, torch.full_like(labels, null))


def save_transformer(model: torch.nn.Module, folder: Path) -> None:
    """``save_pretrained`` in fp16 (weights are upcast on load)."""
    from diffusers.utils import logging as dlogging

    folder.mkdir(parents=True, exist_ok=True)
    previous = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # silence the "should be kept in float32" note of .to(float16)
    try:
        half = model.to("cpu", torch.float16)
        half.save_pretrained(str(folder), safe_serialization=True)
    finally:
        dlogging.set_verbosity(previous)


def generator_settings(*, steps: int, batch_size: int, lr: float, max_minutes: float | None, seed: int,
                       dev: torch.device, ema_decay: float, warmup_steps: int | None) -> TrainSettings:
    """Validated settings of a reference-generator run (warmup: a tenth of the run, at most 500, by default)."""
    settings = TrainSettings(steps=steps, batch_size=batch_size, lr=lr, max_minutes=max_minutes, seed=seed,
                             device=str(dev), ema_decay=ema_decay,
                             warmup_steps=warmup_steps if warmup_steps is not None else default_warmup(steps, 500))
    settings.validate()
    return settings


def fit_flow_model(
    module: torch.nn.Module,
    data: ModuleType,
    settings: TrainSettings,
    dev: torch.device,
    *,
    name: str,
    noise_seed: int,
    predict: Callable[[Callable, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    compile: bool,
    console: Any,
) -> tuple[TrainResult, torch.nn.Module, EMA | None]:
    """Train a class-conditional generator with the rectified-flow objective on ``data`` (a procedural
    data module: ``sample_batch``, ``stream_seed``, ``NUM_CLASSES`` = the null label).

    ``predict(forward, x_t, timestep, labels)`` calls the (maybe compiled) module. Returns the result,
    the final weights (the EMA average when ``settings.ema_decay``) and the EMA.
    """
    ema = EMA(module, settings.ema_decay) if settings.ema_decay else None
    gen = generator_for(noise_seed, dev)
    forward = MaybeCompiled(module, compile, name, console)
    batch_size, seed, null = settings.batch_size, settings.seed, data.NUM_CLASSES

    def loss_fn(step: int) -> torch.Tensor:
        x0, labels = data.sample_batch(batch_size, data.stream_seed(seed, step), dev)
        labels = drop_labels(labels, null, LABEL_DROPOUT, gen)
        x_t, timestep, target = flow_targets(x0, gen)
        with autocast(dev):
            pred = predict(forward, x_t, timestep, labels)
        return F.mse_loss(pred.float(), target)

    result = train_loop(module, loss_fn, settings, dev, label=name, items_per_step=batch_size, ema=ema, console=console)
    final = ema.averaged_copy(module) if ema is not None else module
    return result, final, ema


def run_summary(settings: TrainSettings, result: TrainResult, dev: torch.device, ema: EMA | None,
                compiled: bool, folder: Path) -> dict[str, Any]:
    """The run-describing tail of a generator's ``training.json``."""
    return {
        "settings": asdict(settings),
        "train": result.summary(),
        "device": device_name(dev),
        "torch": torch.__version__,
        "ema": bool(ema),
        "compiled": bool(compiled),
        "weights_dir": str(folder),
    }


def publish(summary: dict[str, Any], result: TrainResult, folder: Path, log_dir: str | os.PathLike | None,
            name: str, console: Any) -> None:
    """Write ``training.json`` next to the saved weights and the logs, and say where the weights went."""
    write_json(folder / "training.json", summary)
    write_history(log_dir, name, result, summary)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    say(console, name, f"wrote {folder} ({size:.1f} MiB)")


def train_image(
    *,
    steps: int = 20000,
    batch_size: int = 256,
    lr: float = 5e-4,
    max_minutes: float | None = None,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    device: str = "auto",
    log_dir: str | os.PathLike | None = None,
    model_overrides: dict[str, Any] | None = None,
    warmup_steps: int | None = None,
    ema_decay: float = 0.999,
    compile: bool = False,
    console: Any = None,
) -> dict[str, Any]:
    """Train the reference image model and write it to ``<out>/reference-image``; returns a summary."""
    console, dev = start_run(device, seed, console)
    settings = generator_settings(steps=steps, batch_size=batch_size, lr=lr, max_minutes=max_minutes, seed=seed,
                                  dev=dev, ema_decay=ema_decay, warmup_steps=warmup_steps)
    model = build_image_model(**(model_overrides or {})).to(dev)
    n_params = count_params(model)
    say(console, NAME, f"DiT {n_params / 1e6:.2f} M params on {device_name(dev)}; batch {batch_size}, "
                       f"lr {lr}, steps {steps}, max {max_minutes} min")
    result, final, ema = fit_flow_model(
        model, shapes, settings, dev, name=NAME, noise_seed=seed * 7919 + 1, compile=compile, console=console,
        predict=lambda forward, x_t, timestep, labels: forward(
            x_t, timestep=timestep, class_labels=labels, return_dict=False)[0],
    )
    folder = weights_folder(out, NAME)
    save_transformer(final, folder)
    summary = {
        "model": NAME,
        "class": "DiTTransformer2DModel",
        "params": n_params,
        "class_names": list(shapes.CLASS_NAMES),
        "data": "diffspeed.data.shapes",
        "objective": "rectified flow, v = eps - x0, logit-normal t, 10% label dropout",
        **run_summary(settings, result, dev, ema, compile, folder),
    }
    publish(summary, result, folder, log_dir, NAME, console)
    return summary
