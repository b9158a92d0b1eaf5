"""Adapter for diffusers ``PixArtTransformer2DModel`` (PixArt-alpha / PixArt-sigma).

Layout: latents (B, C, H, W); condition ``{"encoder_hidden_states": (B, L, caption_channels)}``
(T5 states; optionally ``encoder_attention_mask`` (B, L)). The forward is
``forward(hidden_states, encoder_hidden_states, timestep, added_cond_kwargs, ...)`` and calls each
``BasicTransformerBlock`` as ``block(hidden_states, attention_mask=..., encoder_hidden_states=...,
...)``. ``added_cond_kwargs`` must be a dict; when ``use_additional_conditions`` is on (PixArt-alpha
1024px, ``sample_size == 128``) it needs ``resolution`` (B, 2) and ``aspect_ratio`` (B, 1), which
:meth:`PixArtAdapter.predict` derives from the latent size (8x VAE), as the pipeline does. The
checkpoints predict learned variance (``out_channels = 2 * in_channels``); only the first
``in_channels`` channels are returned.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import BlockGroup, BlockIO, register_adapter
from .common import TextConditionedAdapter, drop_learned_sigma, forward, square_latent_shape

PIXART_BLOCK_IO = BlockIO(
    hidden_arg="hidden_states", encoder_arg="encoder_hidden_states", encoder_pos=2, returns=("hidden",)
)
VAE_SCALE = 8


@register_adapter
class PixArtAdapter(TextConditionedAdapter):
    name = "pixart"
    input_layer = "pos_embed.proj"  # its weight dtype is the compute dtype
    model_classes = ("PixArtTransformer2DModel",)
    timestep_pos = 2  # forward(hidden_states, encoder_hidden_states, timestep, added_cond_kwargs, ...)
    # T5 tokens of the real pipelines (alpha: 120, sigma: 300)
    dummy_text_len = 120

    def block_groups(self, model: nn.Module) -> list[BlockGroup]:
        return [BlockGroup("transformer_blocks", model.transformer_blocks, PIXART_BLOCK_IO)]

    def condition_shapes(self, model: nn.Module, text_len: int | None = None) -> dict[str, tuple[int, ...]]:
        channels = model.config.caption_channels or model.config.cross_attention_dim
        return {"encoder_hidden_states": (text_len or self.dummy_text_len, int(channels))}

    def predict(self, model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        x, kwargs = self.prepare(model, latents, cond)
        if "added_cond_kwargs" not in kwargs:
            if getattr(model, "use_additional_conditions", False):
                b, _, h, w = latents.shape
                res = torch.tensor([h * VAE_SCALE, w * VAE_SCALE], dtype=x.dtype, device=x.device)
                ar = torch.tensor([h / w], dtype=x.dtype, device=x.device)
                kwargs["added_cond_kwargs"] = {"resolution": res.repeat(b, 1), "aspect_ratio": ar.repeat(b, 1)}
            else:
                kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        return drop_learned_sigma(forward(model, x, timestep, kwargs), latents)

    def native_latent_shape(self, model: nn.Module) -> tuple[int, ...]:
        return square_latent_shape(model)
