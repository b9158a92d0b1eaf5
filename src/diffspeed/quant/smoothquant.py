"""SmoothQuant: move activation outliers into the weights before w8a8 quantization.

Per-tensor (or per-token) int8 activations lose almost all their resolution when a few input
channels carry outliers 10-100x larger than the rest, which is typical after the adaLN modulation
of a DiT. Weights, quantized per output channel, tolerate a larger range in a few input columns
much better. SmoothQuant (Xiao et al., 2023) rescales channel ``j`` by

    s_j = max|X_j| ** alpha / max|W_:,j| ** (1 - alpha)

and computes ``(x / s) @ (W * s).T``, which equals ``x @ W.T`` exactly before rounding. ``alpha``
trades how much of the difficulty moves to the weights (0.5 balances both; larger for models with
stronger activation outliers).

At run time the divisor ``1 / s`` is one more elementwise op in the activation quantize step, so
torch.compile fuses it (with the scale, round and cast) into the kernel that produced ``x``: the
smoothing is free. :func:`diffspeed.quant.formats.quantize_linear` takes the factors as ``smooth=``.
"""

from __future__ import annotations

import torch

from ..errors import DiffspeedError


def smooth_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5, eps: float = 1e-5) -> torch.Tensor:
    """Per-in-feature factors ``s`` (fp32, shape ``[in_features]``) for activations with per-channel
    absmax ``act_absmax`` and a ``[out, in]`` ``weight``; apply as ``W * s`` (columns) and ``x / s``.

    Channels that never fired (absmax 0) or weight columns that are all zero get ``s`` clamped to a
    safe range instead of 0 / inf.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise DiffspeedError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    act = torch.as_tensor(act_absmax).detach().float().reshape(-1)
    w = weight.detach().float()
    if w.dim() != 2 or w.shape[1] != act.numel():
        raise DiffspeedError(
            f"smooth_factors: activation stats have {act.numel()} channels, the weight is {list(w.shape)} "
            "(need [out_features, in_features] with in_features == channels)"
        )
    w_max = w.abs().amax(dim=0).to(act.device)
    s = act.clamp_min(eps).pow(alpha) / w_max.clamp_min(eps).pow(1.0 - alpha)
    s = s.clamp(min=eps, max=1.0 / eps)
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


__all__ = ["smooth_factors"]
