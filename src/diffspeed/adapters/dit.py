"""Adapter for diffusers ``DiTTransformer2DModel`` (class-conditional DiT, e.g. facebook/DiT-XL-2-256).

Layout: latents (B, C, H, W); condition ``{"class_labels": LongTensor (B,)}``; the null (unconditional)
class index is ``config.num_embeds_ada_norm`` (the label embedding has one extra row for it). The
model forward is ``forward(hidden_states, timestep, class_labels, ...)`` and calls each
``BasicTransformerBlock`` as ``block(hidden_states, attention_mask=None, encoder_hidden_states=None,
..., timestep=..., class_labels=...)``: there are no encoder hidden states. DiT checkpoints predict a
learned variance too (``out_channels = 2 * in_channels``); :meth:`DiTAdapter.predict` returns only
the first ``in_channels`` channels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import BlockGroup, BlockIO, ModelAdapter, register_adapter

DIT_BLOCK_IO = BlockIO(hidden_arg="hidden_states", encoder_arg=None, returns=("hidden",))


# ---- small helpers shared by the adapter modules of this package ------------------------------


def positional_or_keyword(args: tuple, kwargs: dict, name: str, pos: int) -> Any:
    """Read argument ``name`` of a call that may pass it by keyword or at position ``pos``."""
    if name in kwargs:
        return kwargs[name]
    if len(args) > pos:
        return args[pos]
    return None


def cast_floats(cond: dict[str, Any], ref: torch.Tensor) -> dict[str, Any]:
    """Condition kwargs with floating tensors moved to ``ref``'s device and dtype (others: device only)."""
    out = {}
    for key, value in cond.items():
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                value = value.to(device=ref.device, dtype=ref.dtype)
            else:
                value = value.to(device=ref.device)
        out[key] = value
    return out


def input_dtype(model: nn.Module, attr_path: str, fallback: torch.dtype) -> torch.dtype:
    """Compute dtype of the model's input layer ``attr_path`` (its ``weight``), else ``fallback``.

    The first parameter is not a safe guess: models with ``_keep_in_fp32_modules`` (Wan) loaded or
    built in bf16 have float32 parameters registered before the bf16 ones.
    """
    obj: Any = model
    for part in attr_path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return fallback
    weight = getattr(obj, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    return fallback


def model_device_dtype(model: nn.Module, input_layer: str | None = None) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    dtype = param.dtype if param.is_floating_point() else torch.float32
    if input_layer is not None:
        dtype = input_dtype(model, input_layer, dtype)
    return param.device, dtype


def override_latent_shape(model: nn.Module) -> tuple[int, ...] | None:
    """A per-model latent shape set by the zoo (plain attribute ``diffspeed_latent_shape``), if any."""
    shape = getattr(model, "diffspeed_latent_shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """Standard normal on CPU (so a seeded generator gives the same values on every device), then moved."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


@register_adapter
class DiTAdapter(ModelAdapter):
    name = "dit"
    input_layer = "pos_embed.proj"  # its weight dtype is the compute dtype
    model_classes = ("DiTTransformer2DModel",)

    def block_groups(self, model: nn.Module) -> list[BlockGroup]:
        return [BlockGroup("transformer_blocks", model.transformer_blocks, DIT_BLOCK_IO)]

    def timestep_from_call(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        # forward(hidden_states, timestep, class_labels, ...)
        return positional_or_keyword(args, kwargs, "timestep", 1)

    def condition_shapes(self, model: nn.Module, text_len: int | None = None) -> dict[str, tuple[int, ...]]:
        """Per-sample shapes of the float condition tensors: none, DiT is class-conditional."""
        return {}

    def null_class(self, model: nn.Module) -> int:
        return int(model.config.num_embeds_ada_norm)

    def predict(self, model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        x = latents.to(input_dtype(model, self.input_layer, latents.dtype))
        kwargs = cast_floats(cond, x)
        out = model(hidden_states=x, timestep=timestep, return_dict=False, **kwargs)[0]
        return out[:, : latents.shape[1]].to(latents.dtype)

    def dummy_condition(self, model: nn.Module, batch: int, generator: torch.Generator | None = None):
        device, _ = model_device_dtype(model, self.input_layer)
        n = self.null_class(model)
        labels = torch.randint(0, n, (batch,), generator=generator).to(device)
        return {"class_labels": labels}, {"class_labels": torch.full((batch,), n, dtype=torch.long, device=device)}

    def default_latent_shape(self, model: nn.Module) -> tuple[int, ...]:
        override = override_latent_shape(model)
        if override is not None:
            return override
        size = int(model.config.sample_size)
        return (int(model.config.in_channels), size, size)
