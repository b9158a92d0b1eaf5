"""Adapter for diffusers ``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5 MMDiT).

Layout: latents (B, C, H, W); condition ``{"encoder_hidden_states": (B, L, joint_attention_dim),
"pooled_projections": (B, pooled_projection_dim)}``. The forward is ``forward(hidden_states,
encoder_hidden_states, pooled_projections, timestep, ...)`` and calls each ``JointTransformerBlock``
by keyword (``hidden_states=``, ``encoder_hidden_states=``, ``temb=``); a block returns
``(encoder_hidden_states, hidden_states)``. The last block is ``context_pre_only``: it returns
``encoder_hidden_states = None``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import BlockGroup, BlockIO, ModelAdapter, register_adapter
from .dit import cast_floats, input_dtype, model_device_dtype, override_latent_shape, positional_or_keyword, randn

SD3_BLOCK_IO = BlockIO(
    hidden_arg="hidden_states", encoder_arg="encoder_hidden_states", encoder_pos=1, returns=("encoder", "hidden")
)


@register_adapter
class SD3Adapter(ModelAdapter):
    name = "sd3"
    input_layer = "pos_embed.proj"  # its weight dtype is the compute dtype
    model_classes = ("SD3Transformer2DModel",)
    # 77 CLIP tokens + 256 T5 tokens, as StableDiffusion3Pipeline
    dummy_text_len = 333

    def block_groups(self, model: nn.Module) -> list[BlockGroup]:
        return [BlockGroup("transformer_blocks", model.transformer_blocks, SD3_BLOCK_IO)]

    def timestep_from_call(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        # forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, ...)
        return positional_or_keyword(args, kwargs, "timestep", 3)

    def condition_shapes(self, model: nn.Module, text_len: int | None = None) -> dict[str, tuple[int, ...]]:
        cfg = model.config
        return {
            "encoder_hidden_states": (text_len or self.dummy_text_len, int(cfg.joint_attention_dim)),
            "pooled_projections": (int(cfg.pooled_projection_dim),),
        }

    def predict(self, model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        x = latents.to(input_dtype(model, self.input_layer, latents.dtype))
        kwargs = cast_floats(cond, x)
        out = model(hidden_states=x, timestep=timestep, return_dict=False, **kwargs)[0]
        return out.to(latents.dtype)

    def dummy_condition(self, model: nn.Module, batch: int, generator: torch.Generator | None = None):
        device, dtype = model_device_dtype(model, self.input_layer)
        cond, uncond = {}, {}
        for key, shape in self.condition_shapes(model).items():
            cond[key] = randn((batch, *shape), generator, device, dtype)
            uncond[key] = torch.zeros((batch, *shape), device=device, dtype=dtype)
        return cond, uncond

    def default_latent_shape(self, model: nn.Module) -> tuple[int, ...]:
        override = override_latent_shape(model)
        if override is not None:
            return override
        size = int(model.config.sample_size)
        return (int(model.config.in_channels), size, size)
