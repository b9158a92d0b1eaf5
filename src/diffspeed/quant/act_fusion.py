"""Move the FFN's tanh GELU into the next fp8 layer's activation quantization (used by ``ptq_``).

A diffusers ``FeedForward`` runs ``net = [GELU(proj), Dropout, Linear]``: the GELU writes the 4x-wide
hidden activations, and a dynamic fp8 ``Linear`` then reads them again to find each row's amax and
cast. With the fusion, ``GELU`` keeps only its projection (:class:`ProjOnly`, same parameter names,
so checkpoints load unchanged) and the second layer applies the GELU inside its one-pass quantization
kernel (:mod:`diffspeed.kernels.fp8_quant`): the wide activations are written once and read once.

Only exact rewrites are made: the GELU must be the tanh approximation (what DiT, PixArt, SD3, FLUX
and Wan use), everything between it and the linear must be a ``Dropout`` with ``p == 0``, and the
linear must be a dynamic ``fp8_w8a8`` :class:`~diffspeed.quant.formats.QuantLinear`.
"""

from __future__ import annotations

import torch
from torch import nn

from .formats import QuantLinear


class ProjOnly(nn.Module):
    """A diffusers ``GELU`` whose activation was moved into the next layer (keeps ``proj``'s name)."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states)


def _fusable_target(net: nn.ModuleList) -> QuantLinear | None:
    act = net[0]
    if type(act).__name__ != "GELU" or getattr(act, "approximate", None) != "tanh" \
            or not isinstance(getattr(act, "proj", None), nn.Module):
        return None
    for m in list(net)[1:]:
        if isinstance(m, nn.Dropout) and m.p == 0:
            continue
        if isinstance(m, QuantLinear) and m.fmt == "fp8_w8a8" and m.act == "dynamic" and m.input_gelu == "none":
            return m
        return None
    return None


def fuse_gelu_into_fp8_(model: nn.Module) -> list[str]:
    """Rewrite every fusable ``FeedForward`` of ``model`` in place; returns the fqns of the GELUs moved."""
    fused = []
    for fqn, mod in list(model.named_modules()):
        net = getattr(mod, "net", None)
        if not isinstance(net, nn.ModuleList) or len(net) < 2:
            continue
        target = _fusable_target(net)
        if target is None:
            continue
        net[0] = ProjOnly(net[0].proj)
        target.input_gelu = "tanh"
        fused.append(f"{fqn}.net.0" if fqn else "net.0")
    return fused
