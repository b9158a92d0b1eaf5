"""Kernels: block-sparse attention (a plain-PyTorch reference path on any device, a FlexAttention path on
the GPU) and the one-pass row-wise fp8 activation quantizer (``fp8_quant``: Triton on CUDA, torch ops
elsewhere)."""

from .fp8_quant import rowwise_fp8, rowwise_fp8_reference
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
    "rowwise_fp8",
    "rowwise_fp8_reference",
]
