"""Model adapters: one per diffusers transformer family (see :mod:`diffspeed.adapters.base`).

Importing this package registers every built-in adapter:

============================  ===============================  ==============================================
model class                   block groups (execution order)   latents per sample
============================  ===============================  ==============================================
DiTTransformer2DModel         transformer_blocks               (C, H, W), class labels
PixArtTransformer2DModel      transformer_blocks               (C, H, W), T5 states
SD3Transformer2DModel         transformer_blocks               (C, H, W), text states + pooled
FluxTransformer2DModel        transformer_blocks,              (C, H, W), packed 2x2 inside ``predict``
                              single_transformer_blocks
WanTransformer3DModel         blocks                           (C, F, H, W)
CogVideoXTransformer3DModel   transformer_blocks               (C, F, H, W), permuted inside ``predict``
============================  ===============================  ==============================================
"""

from __future__ import annotations

from . import cogvideox, dit, flux, pixart, sd3, wan  # noqa: F401  (register the adapters)
from .base import (
    BlockGroup,
    BlockIO,
    ModelAdapter,
    get_adapter,
    register_adapter,
    registered_model_classes,
)

__all__ = [
    "BlockGroup",
    "BlockIO",
    "ModelAdapter",
    "get_adapter",
    "register_adapter",
    "registered_model_classes",
]
