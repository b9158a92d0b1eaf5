"""Train ``reference-video``: a class-conditional Wan transformer on :mod:`diffspeed.data.clips`.

The class enters through ``encoder_hidden_states``: a learned table of shape
``(num_classes + 1, tokens, text_dim)`` (last row = null, used for 10 % label dropout), trained
jointly with the transformer and shipped as ``class_embeddings.safetensors``. Same rectified-flow
objective as :mod:`diffspeed.train.image`; the EMA weights are saved in fp16.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import clips
from ..models.reference import (
    CLASS_EMBEDDINGS_FILE,
    CLASS_EMBEDDINGS_KEY,
    VIDEO_EMBED_TOKENS,
    build_video_model,
)
from .common import count_params, device_name, say, start_run, weights_folder
from .image import fit_flow_model, generator_settings, publish, run_summary, save_transformer

NAME = "reference-video"


class ClassConditionedVideo(nn.Module):
    """The Wan transformer plus its learned class-embedding table (trained together)."""

    def __init__(self, transformer: nn.Module, num_classes: int, tokens: int, text_dim: int):
        super().__init__()
        self.transformer = transformer
        self.class_embeddings = nn.Parameter(torch.randn(num_classes + 1, tokens, text_dim))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        states = self.class_embeddings[labels]
        return self.transformer(x, timestep=timestep, encoder_hidden_states=states, return_dict=False)[0]


def save_video_model(module: ClassConditionedVideo, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    table = module.class_embeddings.detach().to("cpu", torch.float16).contiguous()
    save_transformer(module.transformer, folder)
    save_file({CLASS_EMBEDDINGS_KEY: table}, str(folder / CLASS_EMBEDDINGS_FILE))


def _warm_start(module: ClassConditionedVideo, folder: Path) -> None:
    """Load a saved reference-video (fp16 EMA weights + class table) into ``module`` (fp32)."""
    from safetensors.torch import load_file

    from ..errors import WeightFileError

    weights, table = folder / "diffusion_pytorch_model.safetensors", folder / CLASS_EMBEDDINGS_FILE
    if not weights.exists() or not table.exists():
        raise WeightFileError(f"--init-from {folder}: needs diffusion_pytorch_model.safetensors and {CLASS_EMBEDDINGS_FILE}")
    state = {k: v.float() for k, v in load_file(str(weights)).items()}
    missing, unexpected = module.transformer.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rope" not in k]
    if missing or unexpected:
        raise WeightFileError(f"--init-from {folder} does not match the model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    saved = load_file(str(table))[CLASS_EMBEDDINGS_KEY].float()
    if saved.shape != module.class_embeddings.shape:
        raise WeightFileError(f"--init-from {folder}: class table {tuple(saved.shape)} != "
                              f"{tuple(module.class_embeddings.shape)}")
    with torch.no_grad():
        module.class_embeddings.copy_(saved)


def train_video(
    *,
    steps: int = 20000,
    batch_size: int = 64,
    lr: float = 1e-3,
    max_minutes: float | None = None,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    device: str = "auto",
    log_dir: str | os.PathLike | None = None,
    model_overrides: dict[str, Any] | None = None,
    embed_tokens: int = VIDEO_EMBED_TOKENS,
    warmup_steps: int | None = None,
    ema_decay: float = 0.999,
    compile: bool = False,
    init_from: str | os.PathLike | None = None,
    console: Any = None,
) -> dict[str, Any]:
    """Train the reference video model and write it to ``<out>/reference-video``; returns a summary.

    ``init_from``: a reference-video folder (transformer + class table) to continue training from
    (a warm start: the optimizer and the LR schedule start fresh, the weights do not)."""
    console, dev = start_run(device, seed, console)
    settings = generator_settings(steps=steps, batch_size=batch_size, lr=lr, max_minutes=max_minutes, seed=seed,
                                  dev=dev, ema_decay=ema_decay, warmup_steps=warmup_steps)
    transformer = build_video_model(**(model_overrides or {}))
    rope = getattr(transformer, "rope", None)
    for buf in ("freqs_cos", "freqs_sin"):  # float64 RoPE tables would promote q/k math to float64
        if rope is not None and isinstance(getattr(rope, buf, None), torch.Tensor):
            setattr(rope, buf, getattr(rope, buf).float())
    module = ClassConditionedVideo(transformer, clips.NUM_CLASSES, embed_tokens,
                                   int(transformer.config.text_dim)).to(dev)
    if init_from is not None:
        _warm_start(module, Path(init_from))
        say(console, NAME, f"warm start from {init_from}")
    n_params = count_params(transformer)
    say(console, NAME, f"Wan {n_params / 1e6:.2f} M params (+ class table {tuple(module.class_embeddings.shape)}) "
                       f"on {device_name(dev)}; batch {batch_size}, lr {lr}, steps {steps}, max {max_minutes} min")
    result, final, ema = fit_flow_model(
        module, clips, settings, dev, name=NAME, noise_seed=seed * 7919 + 2, compile=compile, console=console,
        predict=lambda forward, x_t, timestep, labels: forward(x_t, timestep, labels),
    )
    folder = weights_folder(out, NAME)
    save_video_model(final, folder)
    summary = {
        "model": NAME,
        "class": "WanTransformer3DModel",
        "params": n_params,
        "class_embeddings_shape": list(module.class_embeddings.shape),
        "class_names": list(clips.CLASS_NAMES),
        "data": "diffspeed.data.clips",
        "objective": "rectified flow, v = eps - x0, logit-normal t, 10% label dropout (null row of the table)",
        **run_summary(settings, result, dev, ema, compile, folder),
        "init_from": str(init_from) if init_from is not None else None,
    }
    publish(summary, result, folder, log_dir, NAME, console)
    return summary
