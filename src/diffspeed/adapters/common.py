"""Helpers shared by the built-in adapters, and :class:`FamilyAdapter`, their common base.

Each adapter module keeps only what is specific to its model family (block layout, argument
positions, extra forward inputs, native latent size); the steps every family repeats live here:
casting latents to the input layer's dtype, moving the condition along, calling the forward,
dropping learned-sigma channels, random text conditions, and the zoo's latent-shape override.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .base import ModelAdapter


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


def random_condition(
    shapes: dict[str, tuple[int, ...]], batch: int, generator: torch.Generator | None, device, dtype
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(cond, uncond) for per-sample ``shapes``: standard normal tensors, and zeros of the same shapes."""
    cond, uncond = {}, {}
    for key, shape in shapes.items():
        cond[key] = randn((batch, *shape), generator, device, dtype)
        uncond[key] = torch.zeros((batch, *shape), device=device, dtype=dtype)
    return cond, uncond


def joint_text_shapes(model: nn.Module, text_len: int) -> dict[str, tuple[int, ...]]:
    """Condition shapes of the MMDiT families (SD3, Flux): text states plus pooled projections."""
    cfg = model.config
    return {
        "encoder_hidden_states": (text_len, int(cfg.joint_attention_dim)),
        "pooled_projections": (int(cfg.pooled_projection_dim),),
    }


def drop_learned_sigma(out: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """The first ``latents.shape[1]`` channels of a learned-variance output, in ``latents``' dtype."""
    return out[:, : latents.shape[1]].to(latents.dtype)


def forward(model: nn.Module, hidden_states: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """The model's first output for one call, as the diffusers pipelines make it."""
    return model(hidden_states=hidden_states, timestep=timestep, return_dict=False, **kwargs)[0]


def square_latent_shape(model: nn.Module) -> tuple[int, ...]:
    """(in_channels, sample_size, sample_size) from the model config."""
    size = int(model.config.sample_size)
    return (int(model.config.in_channels), size, size)


class FamilyAdapter(ModelAdapter):
    """Base of the built-in adapters: the input layer's dtype is the compute dtype, and the zoo may
    set the latent shape on the model (else :meth:`native_latent_shape` gives it from the config)."""

    input_layer: ClassVar[str]  # attribute path of the input layer; its weight dtype is the compute dtype
    timestep_pos: ClassVar[int]  # position of ``timestep`` in the model forward's arguments

    def timestep_from_call(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        return positional_or_keyword(args, kwargs, "timestep", self.timestep_pos)

    def prepare(self, model: nn.Module, latents: torch.Tensor, cond: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """``latents`` cast to the compute dtype, and the condition kwargs moved to match."""
        x = latents.to(input_dtype(model, self.input_layer, latents.dtype))
        return x, cast_floats(cond, x)

    def default_latent_shape(self, model: nn.Module) -> tuple[int, ...]:
        override = override_latent_shape(model)
        if override is not None:
            return override
        return self.native_latent_shape(model)

    def native_latent_shape(self, model: nn.Module) -> tuple[int, ...]:
        """Per-sample latent shape of the family's default resolution, from the model config."""
        raise NotImplementedError


class TextConditionedAdapter(FamilyAdapter):
    """A family conditioned on float tensors (text states, pooled projections) described by
    :meth:`condition_shapes`; dummy conditions are standard normal, their unconditional twins zeros."""

    dummy_text_len: ClassVar[int]

    def condition_shapes(self, model: nn.Module, text_len: int | None = None) -> dict[str, tuple[int, ...]]:
        """Per-sample shapes of the float condition tensors."""
        raise NotImplementedError

    def dummy_condition(self, model: nn.Module, batch: int, generator: torch.Generator | None = None):
        device, dtype = model_device_dtype(model, self.input_layer)
        return random_condition(self.condition_shapes(model), batch, generator, device, dtype)

