"""Error-compensating rounding (GPTQ, Frantar et al. 2022) for ``ptq_``'s int4 and int8 weights.

Round-to-nearest quantizes every weight independently. GPTQ quantizes a layer's input columns one at
a time and pushes each column's rounding error onto the columns not quantized yet, weighted by the
inverse of the layer's input second moment ``H = E[x x^T]``: the update that keeps ``W x`` closest to
the float layer's output for the inputs the layer really sees. The quantized values still lie on the
format's grid (same kernels, same bytes, no run-time cost): the compensation happens once, at
quantization time.

Diffusion-specific part: ``H`` is accumulated over the *whole denoising trajectory* of a few
calibration seeds (every step of every sample, :func:`collect_hessians`), so the compensation is
balanced across the noisy early steps and the clean late ones instead of fitted to one timestep.

Measured (CPU, ``reference-image``, 25 steps, 16 evaluation seeds other than the 8 calibration ones,
``benchmarks/results/compensation_cpu.json``): see the README's quantization section.

Grids (identical to :mod:`diffspeed.quant.formats`):

* int4: asymmetric groups of ``group_size`` input channels, ``w = q * scale + lo`` with ``q`` in
  0..15; a group's ``lo``/``scale`` come from the group's *current* (already error-updated) weights
  when the sweep reaches its first column;
* int8: symmetric per output row, ``w = q * scale`` with ``q`` in -127..127; the row scales come from
  the original weights (fixed before the sweep).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import DiffspeedError

GPTQ_FORMATS = ("int4_weight_only", "int8_w8a8", "int8_weight_only")
_BLOCK = 128  # columns per lazy-update block (the GPTQ paper's trick: fewer full-matrix updates)


@torch.no_grad()
def collect_hessians(model: nn.Module, run_fn: Callable[[], Any], layer_fqns: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{fqn: E[x x^T]}`` (fp32, ``[K, K]``, on the layer's device) of the inputs of ``layer_fqns`` while
    ``run_fn()`` runs (e.g. a few generations through diffspeed's sampler). Hooks are removed after,
    also when ``run_fn`` raises. Memory: ``4 K^2`` bytes per layer."""
    from .calibration import calibrated_linears

    _, modules, fqns = calibrated_linears(model, layer_fqns, "collect_hessians")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {f: 0 for f in fqns}

    def make_hook(fqn: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if fqn not in sums:
                sums[fqn] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            sums[fqn].addmm_(x.t(), x)
            counts[fqn] += x.shape[0]

        return hook

    handles = [modules[f].register_forward_pre_hook(make_hook(f)) for f in fqns]
    try:
        run_fn()
    finally:
        for h in handles:
            h.remove()
    missing = [f for f in fqns if counts[f] == 0]
    if missing:
        raise DiffspeedError(f"collect_hessians: run_fn never called {missing[0]!r} (and {len(missing) - 1} more)")
    return {f: sums[f] / counts[f] for f in fqns}


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (float64 for stability)."""
    h = h.double().clone()
    k = h.shape[0]
    diag = torch.arange(k, device=h.device)
    h[diag, diag] += damp * float(h.diagonal().mean().clamp_min(1e-12))
    for attempt in range(4):
        try:
            low = torch.linalg.cholesky(h)
            return torch.linalg.cholesky(torch.cholesky_inverse(low), upper=True)
        except RuntimeError:  # not positive definite (rank-deficient inputs): damp more
            h[diag, diag] += 10.0 ** attempt * damp * float(h.diagonal().mean().clamp_min(1e-12))
    raise DiffspeedError("GPTQ: the input second-moment matrix is not positive definite even after damping")


def _sweep(w: torch.Tensor, h: torch.Tensor, damp: float,
           round_col: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
    """GPTQ's column sweep over a copy of ``w``: ``round_col(i, W)`` quantizes column ``i`` of the
    error-updated weights ``W`` (recording its codes) and returns the dequantized column; the rounding
    error is pushed onto the later columns through ``H^-1``, lazily per block of ``_BLOCK`` columns."""
    n, k = w.shape
    if tuple(h.shape) != (k, k):
        raise DiffspeedError(f"GPTQ: Hessian shape {tuple(h.shape)} does not match in_features {k}")
    hinv = _inverse_cholesky(h.to(w.device), damp).float()
    W = w.detach().float().clone()
    for b0 in range(0, k, _BLOCK):
        b1 = min(b0 + _BLOCK, k)
        err_block = torch.zeros(n, b1 - b0, device=w.device)
        for i in range(b0, b1):
            err = (W[:, i] - round_col(i, W)) / hinv[i, i]
            W[:, i + 1:b1] -= err[:, None] * hinv[i, i + 1:b1][None, :]
            err_block[:, i - b0] = err
        if b1 < k:
            W[:, b1:] -= err_block @ hinv[b0:b1, b1:]


@torch.no_grad()
def gptq_int4(w: torch.Tensor, h: torch.Tensor, group_size: int, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scales_and_zeros)`` in :func:`diffspeed.quant.formats._int4_groups`'s convention
    (``q`` int32 ``[N, K]`` in 0..15, ``scales_and_zeros`` ``[K/g, N, 2]`` with ``zero = lo + 8 * scale``),
    with GPTQ's error feedback through ``h`` (``[K, K]``)."""
    n, k = w.shape
    if k % group_size:
        raise DiffspeedError(f"GPTQ int4: in_features {k} is not divisible by the group size {group_size}")
    q = torch.zeros(n, k, dtype=torch.int32, device=w.device)
    scales = torch.zeros(k // group_size, n, device=w.device)
    los = torch.zeros(k // group_size, n, device=w.device)

    def round_col(i: int, W: torch.Tensor) -> torch.Tensor:
        g = i // group_size
        if i % group_size == 0:  # this group's grid, from its current (error-updated) weights
            blk = W[:, i:i + group_size]
            lo, hi = blk.amin(dim=1), blk.amax(dim=1)
            scales[g] = ((hi - lo) / 15.0).clamp_min(1e-12)
            los[g] = lo
        qi = ((W[:, i] - los[g]) / scales[g]).round().clamp(0, 15)
        q[:, i] = qi.to(torch.int32)
        return qi * scales[g] + los[g]

    _sweep(w, h, damp, round_col)
    zeros = los + 8.0 * scales
    return q, torch.stack([scales, zeros], dim=-1).contiguous()


@torch.no_grad()
def gptq_int8_rows(w: torch.Tensor, h: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 [N, K], scale fp32 [N])`` in :func:`diffspeed.quant.formats._int8_rows`'s convention,
    with GPTQ's error feedback (the row scales come from the original weights)."""
    n, k = w.shape
    scale = w.detach().float().abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.zeros(n, k, dtype=torch.int8, device=w.device)

    def round_col(i: int, W: torch.Tensor) -> torch.Tensor:
        qi = (W[:, i] / scale).round().clamp(-127, 127)
        q[:, i] = qi.to(torch.int8)
        return qi * scale

    _sweep(w, h, damp, round_col)
    return q, scale


def calibrate_hessians(loaded: Any, fqns: Sequence[str], *, seeds: Sequence[int], labels: Sequence[Any],
                       num_steps: int, guidance_scale: float | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Run the float model through full generations (``seeds``/``labels``, ``num_steps``) and return the
    input second moments of ``fqns`` over every step (see :func:`collect_hessians`)."""
    from ..sampler import generate

    if not seeds:
        raise DiffspeedError("GPTQ calibration needs at least one seed")
    kw: dict[str, Any] = {"num_steps": num_steps, "progress": progress}
    if guidance_scale is not None:
        kw["guidance_scale"] = guidance_scale
    return collect_hessians(loaded.transformer, lambda: generate(loaded, list(labels), list(seeds), **kw), fqns)


__all__ = ["GPTQ_FORMATS", "calibrate_hessians", "collect_hessians", "gptq_int4", "gptq_int8_rows"]
