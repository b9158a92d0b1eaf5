"""int8 storage for embedding tables (``ptq_``'s ``quantize_embeddings``).

Why: with every linear in int4, what is left in bf16 dominates the remaining bytes. In diffusers'
DiT each block's adaLN carries its own class-label table (``norm1.emb.class_embedder``; 1001 x 1152
per block, 62 MB over DiT-XL/2's 28 blocks, 14% of the int4 model). A lookup reads a few rows, so
an int8 table with one scale per row costs nothing measurable at run time and keeps the rows to
within 0.4% of their largest entry (symmetric rounding onto 127 levels).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DiffspeedError
from .formats import _int8_rows


class QuantEmbedding(nn.Module):
    """``nn.Embedding`` with int8 rows (``qweight``, ``[num, dim]``) and per-row scales (``scale``,
    ``[num]`` in the table's float dtype); rows are dequantized on lookup."""

    fmt = "int8_embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        rows = self.qweight[indices]
        return rows.to(self.scale.dtype) * self.scale[indices].unsqueeze(-1)

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, fmt=int8_embedding"


def embedding_unsupported(emb: nn.Embedding) -> str | None:
    """Why ``emb`` cannot be stored as int8 rows (None when it can)."""
    if emb.max_norm is not None:
        return "max_norm renormalises rows at lookup time"
    if emb.sparse:
        return "sparse gradients"
    if emb.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"weight dtype {emb.weight.dtype} is not a float type"
    return None


@torch.no_grad()
def quantize_embedding(emb: nn.Embedding) -> QuantEmbedding:
    """An int8 :class:`QuantEmbedding` of ``emb`` (symmetric, one scale per row)."""
    if not isinstance(emb, nn.Embedding):
        raise DiffspeedError(f"quantize_embedding needs an nn.Embedding, got {type(emb).__name__}")
    if (why := embedding_unsupported(emb)) is not None:
        raise DiffspeedError(f"this embedding cannot be stored in int8: {why}")
    q, scale = _int8_rows(emb.weight.detach().float())  # the same per-row rounding as int8 linear weights
    qe = QuantEmbedding(emb.num_embeddings, emb.embedding_dim)
    qe.register_buffer("qweight", q.contiguous())
    qe.register_buffer("scale", scale.to(emb.weight.dtype))
    return qe
