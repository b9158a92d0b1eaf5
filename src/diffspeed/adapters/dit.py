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

from .base import BlockGroup, BlockIO, register_adapter
from .common import FamilyAdapter, drop_learned_sigma, forward, model_device_dtype, square_latent_shape

DIT_BLOCK_IO = BlockIO(hidden_arg="hidden_states", encoder_arg=None, returns=("hidden",))


@register_adapter
class DiTAdapter(FamilyAdapter):
    name = "dit"
    input_layer = "pos_embed.proj"  # its weight dtype is the compute dtype
    model_classes = ("DiTTransformer2DModel",)
    timestep_pos = 1  # forward(hidden_states, timestep, class_labels, ...)

    def block_groups(self, model: nn.Module) -> list[BlockGroup]:
        return [BlockGroup("transformer_blocks", model.transformer_blocks, DIT_BLOCK_IO)]

    def condition_shapes(self, model: nn.Module, text_len: int | None = None) -> dict[str, tuple[int, ...]]:
        """Per-sample shapes of the float condition tensors: none, DiT is class-conditional."""
        return {}

    def null_class(self, model: nn.Module) -> int:
        return int(model.config.num_embeds_ada_norm)

    def predict(self, model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        x, kwargs = self.prepare(model, latents, cond)
        return drop_learned_sigma(forward(model, x, timestep, kwargs), latents)

    def dummy_condition(self, model: nn.Module, batch: int, generator: torch.Generator | None = None):
        device, _ = model_device_dtype(model, self.input_layer)
        n = self.null_class(model)
        labels = torch.randint(0, n, (batch,), generator=generator).to(device)
        return {"class_labels": labels}, {"class_labels": torch.full((batch,), n, dtype=torch.long, device=device)}

    def native_latent_shape(self, model: nn.Module) -> tuple[int, ...]:
        return square_latent_shape(model)
