"""Fidelity metrics between an accelerated output and the full model's output.

Conventions shared by every function here:

* inputs are tensors of the same shape whose first dimension is the batch (a tensor of fewer than
  2 dimensions is one sample);
* everything is computed in float64 (on the tensors' device), whatever the input dtype;
* the batch is reduced as the **mean of per-sample values** (``reduction="mean"``, the default);
  ``reduction="none"`` returns the list of per-sample values instead.

PSNR of a bit-identical sample is ``inf``. With ``reduction="mean"`` the result is ``inf`` only when
*every* sample is identical; otherwise it is the mean over the samples that differ (an identical
sample has no finite PSNR to average, so it is left out, which errs on the side of lower fidelity).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import DiffspeedError

Reduction = Literal["mean", "none"]


def _check(a: torch.Tensor, b: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise DiffspeedError(f"{name} needs two tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.shape != b.shape:
        raise DiffspeedError(f"{name}: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if b.device != a.device:
        b = b.to(a.device)
    a = a.detach().to(torch.float64)
    b = b.detach().to(torch.float64)
    if a.dim() < 2:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    return a, b


def _reduce(values: list[float], reduction: Reduction) -> float | list[float]:
    if reduction == "none":
        return values
    if reduction != "mean":
        raise DiffspeedError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return float(sum(values) / len(values)) if values else float("nan")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, reduction: Reduction = "mean") -> float | list[float]:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / mse)`` per sample.

    ``inf`` for identical samples; see the module docstring for how the batch mean treats them.
    """
    a, b = _check(a, b, "psnr")
    if data_range <= 0:
        raise DiffspeedError(f"psnr: data_range must be > 0, got {data_range}")
    mse = (a - b).pow(2).flatten(1).mean(dim=1).tolist()
    per = [math.inf if m == 0.0 else 10.0 * math.log10(data_range**2 / m) for m in mse]
    if reduction == "none":
        return per
    finite = [p for p in per if math.isfinite(p)]
    if not finite:
        return math.inf
    return _reduce(finite, reduction)


def rel_error(a: torch.Tensor, b: torch.Tensor, reduction: Reduction = "mean") -> float | list[float]:
    """Relative error ``||a - b|| / ||b||`` (Frobenius norm over each sample), ``b`` the reference.

    A zero reference gives 0 when ``a`` is zero too, else ``inf``.
    """
    a, b = _check(a, b, "rel_error")
    diff = (a - b).flatten(1).norm(dim=1).tolist()
    ref = b.flatten(1).norm(dim=1).tolist()
    per = [(0.0 if d == 0.0 else math.inf) if r == 0.0 else d / r for d, r in zip(diff, ref)]
    return _reduce(per, reduction)


def _gaussian_window(size: int, sigma: float, channels: int, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    g = g / g.sum()
    w2 = torch.outer(g, g)
    return w2.expand(channels, 1, size, size).contiguous()


def _ssim_images(
    x: torch.Tensor, y: torch.Tensor, data_range: float, win_size: int, sigma: float, k1: float, k2: float
) -> torch.Tensor:
    """Per-image SSIM of (N, C, H, W) float64 tensors -> (N,)."""
    n, c, h, w = x.shape
    size = min(win_size, h, w)
    if size % 2 == 0:
        size -= 1
    window = _gaussian_window(size, sigma, c, x.device)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2

    def filt(t: torch.Tensor) -> torch.Tensor:  # 'valid' Gaussian filter, as Wang et al.'s reference code
        return F.conv2d(t, window, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return (num / den).flatten(1).mean(dim=1)


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 1.0,
    reduction: Reduction = "mean",
    *,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float | list[float]:
    """Structural similarity (Wang et al. 2004) with an 11x11 Gaussian window, sigma 1.5.

    Images (B, C, H, W) or videos (B, C, F, H, W) with values in ``[0, data_range]``. Each channel
    is filtered separately ('valid' filtering, no padding) and the SSIM map is averaged over
    channels and positions; a video's SSIM is the mean over its frames. Images smaller than the
    window use the largest odd window that fits. Identical inputs give exactly 1.
    """
    a, b = _check(a, b, "ssim")
    if a.dim() == 4:
        per = _ssim_images(a, b, data_range, win_size, sigma, k1, k2)
    elif a.dim() == 5:
        bsz, c, f, h, w = a.shape
        xa = a.permute(0, 2, 1, 3, 4).reshape(bsz * f, c, h, w)
        xb = b.permute(0, 2, 1, 3, 4).reshape(bsz * f, c, h, w)
        per = _ssim_images(xa, xb, data_range, win_size, sigma, k1, k2).reshape(bsz, f).mean(dim=1)
    else:
        raise DiffspeedError(f"ssim needs images (B, C, H, W) or videos (B, C, F, H, W), got shape {tuple(a.shape)}")
    return _reduce(per.tolist(), reduction)
