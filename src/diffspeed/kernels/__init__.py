"""Attention kernels: a plain-PyTorch reference path (any device) and a FlexAttention path (GPU)."""

from .sparse_attn import (
    block_selection,
    block_sparse_attention,
    flex_available,
    flex_block_sparse_attention,
    masked_block_attention_dense,
)

__all__ = [
    "block_selection",
    "block_sparse_attention",
    "flex_available",
    "flex_block_sparse_attention",
    "masked_block_attention_dense",
]
