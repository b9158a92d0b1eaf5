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
from typing import Any

import torch
import torch.nn.functional as F

from ..data import shapes
from ..models.reference import build_image_model
from .common import (
    EMA,
    MaybeCompiled,
    TrainSettings,
    autocast,
    configure_backends,
    count_params,
    default_weights_dir,
    device_name,
    generator_for,
    rand,
    randn,
    resolve_device,
    sample_flow_t,
    save_loss_curve,
    train_loop,
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
    from rich.console import Console

    console = console or Console(soft_wrap=True)
    dev = resolve_device(device)
    configure_backends(dev)
    torch.manual_seed(seed)
    settings = TrainSettings(steps=steps, batch_size=batch_size, lr=lr, max_minutes=max_minutes, seed=seed,
                             device=str(dev), ema_decay=ema_decay,
                             warmup_steps=warmup_steps if warmup_steps is not None else min(500, max(1, steps // 10)))
    settings.validate()
    model = build_image_model(**(model_overrides or {})).to(dev)
    null = shapes.NUM_CLASSES
    n_params = count_params(model)
    console.print(f"[{NAME}] DiT {n_params / 1e6:.2f} M params on {device_name(dev)}; batch {batch_size}, "
                  f"lr {lr}, steps {steps}, max {max_minutes} min", highlight=False, markup=False)
    ema = EMA(model, ema_decay) if ema_decay else None
    gen = generator_for(seed * 7919 + 1, dev)
    forward = MaybeCompiled(model, compile, NAME, console)

    def loss_fn(step: int) -> torch.Tensor:
        x0, labels = shapes.sample_batch(batch_size, shapes.stream_seed(seed, step), dev)
        labels = drop_labels(labels, null, LABEL_DROPOUT, gen)
        x_t, timestep, target = flow_targets(x0, gen)
        with autocast(dev):
            pred = forward(x_t, timestep=timestep, class_labels=labels, return_dict=False)[0]
        return F.mse_loss(pred.float(), target)

    result = train_loop(model, loss_fn, settings, dev, label=NAME, items_per_step=batch_size, ema=ema, console=console)

    out_root = Path(out) if out is not None else default_weights_dir()
    folder = out_root / NAME
    final = ema.averaged_copy(model) if ema is not None else model
    save_transformer(final, folder)
    summary = {
        "model": NAME,
        "class": "DiTTransformer2DModel",
        "params": n_params,
        "class_names": list(shapes.CLASS_NAMES),
        "data": "diffspeed.data.shapes",
        "objective": "rectified flow, v = eps - x0, logit-normal t, 10% label dropout",
        "settings": asdict(settings),
        "train": result.summary(),
        "device": device_name(dev),
        "torch": torch.__version__,
        "ema": bool(ema),
        "compiled": bool(compile),
        "weights_dir": str(folder),
    }
    write_json(folder / "training.json", summary)
    logs = Path(log_dir) if log_dir is not None else None
    if logs is not None:
        save_loss_curve(result.history, logs / f"{NAME}-loss.png", f"{NAME} training loss")
        write_json(logs / f"{NAME}-history.json", {"summary": summary, "history": result.history})
    size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    console.print(f"[{NAME}] wrote {folder} ({size:.1f} MiB)", highlight=False, markup=False)
    return summary
