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

from .base import BlockGroup, BlockIO, register_adapter
from .common import TextConditionedAdapter, forward, joint_text_shapes, square_latent_shape

SD3_BLOCK_IO = BlockIO(
    hidden_arg="hidden_states", encoder_arg="encoder_hidden_states", encoder_pos=1, returns=("encoder", "hidden")
)


@register_adapter
class SD3Adapter(TextConditionedAdapter):
    name = "sd3"
    input_layer = "pos_embed.proj"  # its weight dtype is the compute dtype
    model_classes = ("SD3Transformer2DModel",)
    timestep_pos = 3  # forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, ...)
    # 77 CLIP tokens + 256 T5 tokens, as StableDiffusion3Pipeline
    dummy_text_len = 333

    def block_groups(self, model: nn.Module) -> list[BlockGroup]:
        return [BlockGroup("transformer_blocks", model.transformer_blocks, SD3_BLOCK_IO)]

    def condition_shapes(self, model: nn.Module, text_len: int | None = None) -> dict[str, tuple[int, ...]]:
        return joint_text_shapes(model, text_len or self.dummy_text_len)

    def predict(self, model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        x, kwargs = self.prepare(model, latents, cond)
        return forward(model, x, timestep, kwargs).to(latents.dtype)

    def native_latent_shape(self, model: nn.Module) -> tuple[int, ...]:
        return square_latent_shape(model)
