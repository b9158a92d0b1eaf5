"""Adapter for diffusers ``WanTransformer3DModel`` (Wan 2.1 / 2.2 text-to-video).

Layout: latents (B, C, F, H, W), the model's own layout; condition
``{"encoder_hidden_states": (B, L, text_dim)}`` (umT5 states; optionally
``encoder_hidden_states_image`` for I2V checkpoints). The forward is ``forward(hidden_states,
timestep, encoder_hidden_states, ...)``; blocks live in ``model.blocks`` and are called
**positionally**: ``block(hidden_states, encoder_hidden_states, timestep_proj, rotary_emb)``; a
block returns the hidden states only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import BlockGroup, BlockIO, register_adapter
from .common import TextConditionedAdapter, forward

WAN_BLOCK_IO = BlockIO(
    hidden_arg="hidden_states", encoder_arg="encoder_hidden_states", encoder_pos=1, returns=("hidden",)
)


@register_adapter
class WanAdapter(TextConditionedAdapter):
    name = "wan"
    input_layer = "patch_embedding"  # its weight dtype is the compute dtype
    model_classes = ("WanTransformer3DModel",)
    timestep_pos = 1  # forward(hidden_states, timestep, encoder_hidden_states, ...)
    # umT5 tokens of WanPipeline (max_sequence_length=512)
    dummy_text_len = 512

    def block_groups(self, model: nn.Module) -> list[BlockGroup]:
        return [BlockGroup("blocks", model.blocks, WAN_BLOCK_IO)]

    def condition_shapes(self, model: nn.Module, text_len: int | None = None) -> dict[str, tuple[int, ...]]:
        return {"encoder_hidden_states": (text_len or self.dummy_text_len, int(model.config.text_dim))}

    def predict(self, model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        x, kwargs = self.prepare(model, latents, cond)
        return forward(model, x, timestep, kwargs).to(latents.dtype)

    def native_latent_shape(self, model: nn.Module) -> tuple[int, ...]:
        # 81 frames at 480x832 with the Wan VAE (4x temporal, 8x spatial): 21 x 60 x 104 latents
        return (int(model.config.in_channels), 21, 60, 104)
