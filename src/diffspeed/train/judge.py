"""Train the judge classifiers on the procedural data (cross-entropy, on-the-fly batches).

Light augmentation (random Gaussian noise and a random mild blur) makes the judges tolerant of
the small artefacts of generated samples without blurring the class boundaries; accuracy on the
held-out real set is measured after training and stored in the judge's ``config.json``.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F

from ..data import clips, shapes
from ..errors import DiffspeedError
from ..models.judge import build_judge_net, judge_config, load_judge, save_judge, judge_accuracy, per_class_accuracy
from .common import (
    TrainSettings,
    autocast,
    count_params,
    default_warmup,
    device_name,
    generator_for,
    rand,
    randn,
    say,
    start_run,
    train_loop,
    weights_folder,
    write_history,
)

HELDOUT = {"image": 2400, "video": 800}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x in [-1, 1], (B, C, ...) -> per-sample random blur mix and Gaussian noise, clamped."""
    b = x.shape[0]
    view = (b,) + (1,) * (x.dim() - 1)
    # blur each image / each frame of a clip with a 3x3 box filter
    spatial = x.transpose(1, 2).flatten(0, 1) if x.dim() == 5 else x  # (B*F, C, H, W) for clips
    blurred = F.avg_pool2d(F.pad(spatial, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    if x.dim() == 5:
        blurred = blurred.view(b, x.shape[2], x.shape[1], *x.shape[3:]).transpose(1, 2)
    mix = rand((b,), gen, x.device).view(view) * 0.6 * (rand((b,), gen, x.device) < 0.5).float().view(view)
    x = x + mix * (blurred - x)
    sigma = rand((b,), gen, x.device).view(view) * 0.12
    x = x + sigma * randn(tuple(x.shape), gen, x.device)
    return x.clamp(-1, 1)


def train_judge(
    kind: str,
    *,
    steps: int = 3000,
    batch_size: int = 256,
    lr: float = 2e-3,
    max_minutes: float | None = None,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    device: str = "auto",
    log_dir: str | os.PathLike | None = None,
    heldout: int | None = None,
    channels: tuple[int, ...] | None = None,
    console: Any = None,
) -> dict[str, Any]:
    """Train ``judge-<kind>`` (kind: image or video), save it to ``<out>/judge-<kind>``; returns a summary."""
    if kind not in ("image", "video"):
        raise DiffspeedError(f"judge kind must be 'image' or 'video', got {kind!r}")
    name = f"judge-{kind}"
    data = shapes if kind == "image" else clips
    console, dev = start_run(device, seed, console)
    extra = {"channels": list(channels)} if channels else {}
    config = judge_config(kind, **extra)
    net = build_judge_net(config).to(dev)
    settings = TrainSettings(steps=steps, batch_size=batch_size, lr=lr, max_minutes=max_minutes, seed=seed,
                             device=str(dev), ema_decay=None, weight_decay=0.05,
                             warmup_steps=default_warmup(steps, 200))
    settings.validate()
    say(console, name, f"{count_params(net) / 1e6:.2f} M params on {device_name(dev)}; batch {batch_size}, "
                       f"lr {lr}, steps {steps}, max {max_minutes} min")
    gen = generator_for(seed * 7919 + 3, dev)
    judge_seed = seed + 1000  # a different stream from the generative models' training data

    def loss_fn(step: int) -> torch.Tensor:
        x, labels = data.sample_batch(batch_size, data.stream_seed(judge_seed, step), dev)
        x = augment(x, gen)
        with autocast(dev):
            logits = net(x)
        return F.cross_entropy(logits.float(), labels, label_smoothing=0.05)

    result = train_loop(net, loss_fn, settings, dev, label=name, items_per_step=batch_size, console=console)

    n_heldout = heldout if heldout is not None else HELDOUT[kind]
    folder = weights_folder(out, name)
    config["training"] = {"settings": asdict(settings), "train": result.summary(), "device": device_name(dev)}
    save_judge(net.float(), config, folder)
    # evaluate the saved (fp16-rounded) judge on the held-out real set
    judge = load_judge(name, device=dev, weights_dir=folder.parent)
    x, labels = data.make_dataset(n_heldout, device=dev)
    pixels = (x + 1) / 2
    acc = judge_accuracy(judge, pixels, labels.cpu())
    per_class = per_class_accuracy(judge, pixels, labels.cpu())
    config["heldout_accuracy"] = acc
    config["heldout_samples"] = n_heldout
    config["heldout_per_class"] = per_class
    save_judge(net.float(), config, folder)
    say(console, name, f"held-out real accuracy {acc:.4f} on {n_heldout} samples; worst class "
                       f"{min(per_class, key=per_class.get)} {min(per_class.values()):.3f}; wrote {folder}")
    summary = {"judge": name, "heldout_accuracy": acc, "heldout_samples": n_heldout, "per_class": per_class,
               "params": count_params(net), "train": result.summary(), "device": device_name(dev)}
    write_history(log_dir, name, result, summary)
    return summary
