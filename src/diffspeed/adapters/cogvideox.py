"""Adapter for diffusers ``CogVideoXTransformer3DModel`` (CogVideoX 1.0 / 1.5).

Layout: the adapter's latents are (B, C, F, H, W) like Wan; the model takes (B, F, C, H, W), so
:meth:`CogVideoXAdapter.predict` permutes in and out. Condition ``{"encoder_hidden_states": (B, L,
text_embed_dim)}``; without rotary embeddings (CogVideoX-2b) the sin-cos position table covers
exactly ``max_text_seq_length`` text tokens, so ``L`` must equal it. With
``use_rotary_positional_embeddings`` (5b, 1.5) ``predict`` builds ``image_rotary_emb`` as
``CogVideoXPipeline._prepare_rotary_positional_embeddings`` does; models with ``ofs_embed_dim``
get ``ofs = 2.0`` like the pipeline. The forward is ``forward(hidden_states, encoder_hidden_states,
timestep, ...)`` and calls each ``CogVideoXBlock`` by keyword; a block returns
``(hidden_states, encoder_hidden_states)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import BlockGroup, BlockIO, register_adapter
from .common import TextConditionedAdapter, forward

COGVIDEOX_BLOCK_IO = BlockIO(
    hidden_arg="hidden_states", encoder_arg="encoder_hidden_states", encoder_pos=1, returns=("hidden", "encoder")
)


def _resize_crop_region_for_grid(src: tuple[int, int], tgt_width: int, tgt_height: int):
    # copy of diffusers.pipelines.cogvideo.pipeline_cogvideox.get_resize_crop_region_for_grid
    tw, th = tgt_width, tgt_height
    h, w = src
    if h / w > th / tw:
        resize_height, resize_width = th, int(round(th / h * w))
    else:
        resize_width, resize_height = tw, int(round(tw / w * h))
    crop_top = int(round((th - resize_height) / 2.0))
    crop_left = int(round((tw - resize_width) / 2.0))
    return (crop_top, crop_left), (crop_top + resize_height, crop_left + resize_width)


def rotary_embeddings(model: nn.Module, frames: int, height: int, width: int, device: torch.device):
    """``image_rotary_emb`` for latents of F x H x W (latent units), as the CogVideoX pipeline builds it."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    cfg = model.config
    p, p_t = cfg.patch_size, cfg.patch_size_t
    grid_h, grid_w = height // p, width // p
    base_w, base_h = cfg.sample_width // p, cfg.sample_height // p
    if p_t is None:
        crops = _resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
        return get_3d_rotary_pos_embed(
            embed_dim=cfg.attention_head_dim, crops_coords=crops, grid_size=(grid_h, grid_w),
            temporal_size=frames, device=device,
        )
    return get_3d_rotary_pos_embed(
        embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=(grid_h, grid_w),
        temporal_size=(frames + p_t - 1) // p_t, grid_type="slice", max_size=(base_h, base_w), device=device,
    )


@register_adapter
class CogVideoXAdapter(TextConditionedAdapter):
    name = "cogvideox"
    input_layer = "patch_embed.proj"  # its weight dtype is the compute dtype
    model_classes = ("CogVideoXTransformer3DModel",)
    timestep_pos = 2  # forward(hidden_states, encoder_hidden_states, timestep, ...)

    def block_groups(self, model: nn.Module) -> list[BlockGroup]:
        return [BlockGroup("transformer_blocks", model.transformer_blocks, COGVIDEOX_BLOCK_IO)]

    def condition_shapes(self, model: nn.Module, text_len: int | None = None) -> dict[str, tuple[int, ...]]:
        cfg = model.config
        if not cfg.use_rotary_positional_embeddings:
            text_len = None  # the sin-cos table fixes the text length
        return {"encoder_hidden_states": (text_len or int(cfg.max_text_seq_length), int(cfg.text_embed_dim))}

    def predict(self, model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        b, _, f, h, w = latents.shape
        cfg = model.config
        x, kwargs = self.prepare(model, latents, cond)
        if cfg.use_rotary_positional_embeddings and kwargs.get("image_rotary_emb") is None:
            kwargs["image_rotary_emb"] = rotary_embeddings(model, f, h, w, latents.device)
        if cfg.ofs_embed_dim and kwargs.get("ofs") is None:
            kwargs["ofs"] = torch.full((b,), 2.0, device=x.device, dtype=x.dtype)
        out = forward(model, x.permute(0, 2, 1, 3, 4), timestep, kwargs)
        return out.permute(0, 2, 1, 3, 4).to(latents.dtype)

    def native_latent_shape(self, model: nn.Module) -> tuple[int, ...]:
        cfg = model.config
        frames = (int(cfg.sample_frames) - 1) // int(cfg.temporal_compression_ratio) + 1
        if cfg.patch_size_t is not None and frames % cfg.patch_size_t:
            frames += cfg.patch_size_t - frames % cfg.patch_size_t  # the pipeline pads to a multiple
        return (int(cfg.in_channels), frames, int(cfg.sample_height), int(cfg.sample_width))
