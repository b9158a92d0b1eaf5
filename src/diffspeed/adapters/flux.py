"""Adapter for diffusers ``FluxTransformer2DModel`` (FLUX.1 dev / schnell).

Two block groups run in order: ``transformer_blocks`` (double-stream ``FluxTransformerBlock``) then
``single_transformer_blocks`` (``FluxSingleTransformerBlock``). Both are called by keyword
(``hidden_states=``, ``encoder_hidden_states=``, ``temb=``, ``image_rotary_emb=``) and both return
``(encoder_hidden_states, hidden_states)``.

Layout: the adapter's latents are (B, C, H, W) with ``C = in_channels // 4``; :meth:`FluxAdapter.predict`
packs 2x2 patches into the (B, H/2 * W/2, 4C) token sequence the model takes, builds ``img_ids`` /
``txt_ids`` as ``FluxPipeline`` does, and unpacks the output. Condition:
``{"encoder_hidden_states": (B, L, joint_attention_dim), "pooled_projections": (B, pooled_dim)}``,
optionally ``"guidance"`` (B,) for guidance-distilled models (default :attr:`FluxAdapter.default_guidance`
when ``config.guidance_embeds``). The forward takes sigma in [0, 1] as ``timestep`` and multiplies it by
1000 itself, so ``predict`` divides the sampler's 1000-scale timestep by 1000. Leave ``img_ids`` /
``txt_ids`` out of the condition: they are not batch-first (the sampler would concatenate them for
batched CFG) and ``predict`` builds them from the latent and text sizes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import BlockGroup, BlockIO, register_adapter
from .common import TextConditionedAdapter, forward, joint_text_shapes

FLUX_BLOCK_IO = BlockIO(
    hidden_arg="hidden_states", encoder_arg="encoder_hidden_states", encoder_pos=1, returns=("encoder", "hidden")
)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), as ``FluxPipeline._pack_latents``."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W), as ``FluxPipeline._unpack_latents`` (latent units)."""
    b, _, ch = tokens.shape
    x = tokens.view(b, height // 2, width // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(H/2 * W/2, 3) position ids of the packed tokens, as ``FluxPipeline._prepare_latent_image_ids``."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device)


@register_adapter
class FluxAdapter(TextConditionedAdapter):
    name = "flux"
    input_layer = "x_embedder"  # its weight dtype is the compute dtype
    model_classes = ("FluxTransformer2DModel",)
    timestep_pos = 3  # forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, ...)
    timestep_scale = 1.0
    default_guidance = 3.5
    # T5 tokens of FLUX.1-dev (schnell uses 256)
    dummy_text_len = 512

    def block_groups(self, model: nn.Module) -> list[BlockGroup]:
        return [
            BlockGroup("transformer_blocks", model.transformer_blocks, FLUX_BLOCK_IO),
            BlockGroup("single_transformer_blocks", model.single_transformer_blocks, FLUX_BLOCK_IO),
        ]

    def condition_shapes(self, model: nn.Module, text_len: int | None = None) -> dict[str, tuple[int, ...]]:
        return joint_text_shapes(model, text_len or self.dummy_text_len)

    def predict(self, model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        b, _, h, w = latents.shape
        if h % 2 or w % 2:
            raise ValueError(f"Flux latents need even height and width, got {h}x{w}")
        x, kwargs = self.prepare(model, latents, cond)
        enc = kwargs["encoder_hidden_states"]
        if "txt_ids" not in kwargs:
            kwargs["txt_ids"] = torch.zeros(enc.shape[1], 3, device=latents.device)
        if "img_ids" not in kwargs:
            kwargs["img_ids"] = latent_image_ids(h, w, latents.device)
        if model.config.guidance_embeds:
            if kwargs.get("guidance") is None:
                kwargs["guidance"] = torch.full((b,), self.default_guidance, device=latents.device, dtype=torch.float32)
        else:
            kwargs.pop("guidance", None)
        out = forward(model, pack_latents(x), timestep / 1000.0, kwargs)
        return unpack_latents(out, h, w).to(latents.dtype)

    def native_latent_shape(self, model: nn.Module) -> tuple[int, ...]:
        # 1024x1024 pixels with the 8x FLUX VAE
        return (int(model.config.in_channels) // 4, 128, 128)
