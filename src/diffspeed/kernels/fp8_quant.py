"""Row-wise FP8 activation quantization in one pass (optionally with the tanh-GELU that precedes it).

Why a hand-written kernel: a dynamic FP8 linear must, for every token row, find ``amax |x|``, divide
by ``amax / 448`` and cast to e4m3 before ``torch._scaled_mm``. Left to Inductor, this reduction is
fused with its producer (the FFN's GELU, the norm + modulation) into a looped two-pass reduction
kernel; on DiT-XL/2 (H100, batch 64, 4608-wide FFN rows) that kernel took about three times as long
as the GELU alone and ate the GEMM's FP8 gain (``quant_fp8fix.json``, session 5). Here each program
holds whole rows in registers: one read of the activations, one write of the fp8 codes and the
per-row scales. It is registered once, when this module is imported on a machine with CUDA and
Triton, as the ``torch.library.triton_op`` ``diffspeed::rowwise_fp8_cuda``: Inductor calls it as is
(it does not re-fuse it), and no registration ever happens inside a compile trace (an earlier
version built it lazily behind ``functools.lru_cache``, which broke the graph at every layer).

``gelu="tanh"`` applies ``x * sigmoid(2 * sqrt(2/pi) * (x + 0.044715 x^3))`` (the tanh GELU, exactly)
in fp32 before the quantization, so the FFN's hidden activations are read once instead of written by
the GELU and read again. The result differs from "bf16 GELU, then quantize" only by the bf16
rounding of the GELU output that it skips.

CPU and other devices run :func:`rowwise_fp8_reference` (same math in torch ops); the CUDA path is
checked against it in ``tests/test_fp8_quant_kernel.py`` (CUDA-only tests).

Where it is used (``formats.FP8_ACT_KERNEL="auto"``): only for the GELU-fused FFN input. Each call
costs host time, about 0.1 ms in a compiled model (``fp8_diag.json`` session 5 diag B: every input
through it, 24 calls, 6.54 ms wall for 3.98 ms of device time), so it is used only where it saves
more device time than that: on DiT-XL/2 at batch 64 the fused GELU + quantization takes 0.13 ms per
block against 0.32 ms for Inductor's fused reduction. Inputs that come out of a norm + modulation are
left to Inductor, which fuses their quantization into the norm kernel at 1.1-1.3x the bf16 norm's
time (same profiles).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_MAX = 448.0  # largest float8 e4m3fn value
GELU_MODES = ("none", "tanh")


def rowwise_fp8_reference(x: torch.Tensor, smooth: torch.Tensor | None, gelu: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes [M, K] float8_e4m3fn, scales [M, 1] fp32)`` of a 2-D ``x``, in plain torch ops."""
    xf = x.float()
    if gelu == "tanh":
        xf = F.gelu(xf, approximate="tanh")
    if smooth is not None:
        xf = xf / smooth
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / FP8_MAX
    codes = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, smooth_ptr, q_ptr, scale_ptr, n_rows, n_cols, stride_x, stride_q,
               HAS_SMOOTH: tl.constexpr, GELU: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        row_ok = rows < n_rows
        col_ok = cols < n_cols
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if GELU:
            x = x * tl.sigmoid(2.0 * 0.7978845608028654 * (x + 0.044715 * x * x * x))
        if HAS_SMOOTH:
            s = tl.load(smooth_ptr + cols, mask=col_ok, other=1.0)
            x = x / s[None, :]
        scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-8) / 448.0
        q = tl.minimum(tl.maximum(x / scale[:, None], -448.0), 448.0)
        tl.store(q_ptr + rows[:, None] * stride_q + cols[None, :], q.to(tl.float8e4nv), mask=mask)
        tl.store(scale_ptr + rows, scale, mask=row_ok)

    return kernel


def _launch(x: torch.Tensor, smooth: torch.Tensor | None, gelu: str) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.library import wrap_triton

    x = x if x.stride(-1) == 1 else x.contiguous()
    m, k = x.shape
    codes = torch.empty((m, k), device=x.device, dtype=torch.float8_e4m3fn)
    scales = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    if m == 0:
        return codes, scales
    block = 1 << max(0, (k - 1).bit_length())  # next power of two
    rows = max(1, min(16, 4096 // block))  # about 4096 elements per program
    warps = 4 if rows * block <= 2048 else 8 if rows * block <= 8192 else 16
    smooth_arg = smooth.float().contiguous() if smooth is not None else scales  # unused when absent
    wrap_triton(_KERNEL)[(-(-m // rows),)](x, smooth_arg, codes, scales, m, k, x.stride(0), codes.stride(0),
                                           HAS_SMOOTH=smooth is not None, GELU=gelu == "tanh", ROWS=rows,
                                           BLOCK=block, num_warps=warps)
    return codes, scales


_KERNEL = None  # the Triton kernel and the op wrapping it (set at import where CUDA and Triton exist)
_CUDA_OP = None


def triton_available() -> bool:
    """True when Triton imports (the CUDA path of :func:`rowwise_fp8` needs it)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no Triton path
        return False
    return True


def _register_cuda_op() -> None:
    global _KERNEL, _CUDA_OP
    from torch.library import triton_op

    _KERNEL = _build_kernel()

    @triton_op("diffspeed::rowwise_fp8_cuda", mutates_args={})
    def rowwise_fp8_cuda(x: torch.Tensor, smooth: torch.Tensor | None, gelu: str) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch(x, smooth, gelu)

    _CUDA_OP = rowwise_fp8_cuda


def rowwise_fp8(x: torch.Tensor, smooth: torch.Tensor | None, gelu: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the rows of a 2-D ``x`` to float8 e4m3 with one fp32 scale per row (``amax / 448``),
    after an optional tanh GELU (``gelu="tanh"``) and division by a per-column ``smooth`` vector.
    CUDA with Triton: the one-pass kernel; elsewhere: the same math in torch ops."""
    if gelu not in GELU_MODES:
        raise ValueError(f"rowwise_fp8: gelu must be one of {GELU_MODES}, got {gelu!r}")
    if x.dim() != 2:
        raise ValueError(f"rowwise_fp8 takes a 2-D tensor, got shape {tuple(x.shape)}")
    if x.is_cuda and _CUDA_OP is not None:
        return _CUDA_OP(x, smooth, gelu)
    return rowwise_fp8_reference(x, smooth, gelu)


if torch.cuda.is_available() and triton_available():
    _register_cuda_op()
