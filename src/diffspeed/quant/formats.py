"""Low-bit linear layers that run on real low-precision kernels (no fake quantization).

:class:`QuantLinear` replaces an ``nn.Linear``. Its weight is stored quantized as buffers and every
forward runs a low-precision matmul op of torch itself; the op's name is in ``QuantLinear.kernel``:

=====================  ==========================================  ===========================================
format                 weight storage                              matmul op
=====================  ==========================================  ===========================================
``int8_w8a8``          int8, symmetric per-output-channel scales   ``torch._int_mm`` (int8 x int8 -> int32)
``fp8_w8a8``           float8 e4m3, per-output-row scales          ``torch._scaled_mm`` (CUDA sm89+ only)
``int8_weight_only``   int8, per-output-channel scales             CPU: ``torch._weight_int8pack_mm``; CUDA:
                                                                   int8 weights cast for a bf16 GEMM (not
                                                                   a low-bit GEMM: the CUDA int8pack
                                                                   kernel is a small-M decode kernel)
``int4_weight_only``   4-bit groupwise, asymmetric               ``int4_kernel="tinygemm"``:
                       (``(q - 8) * scale + zero``): tinygemm's    ``torch._weight_int4pack_mm`` (CUDA, bf16)
                       packed layout, or two values per byte       / ``_weight_int4pack_mm_for_cpu``;
                       for ``int4_kernel="dequant"``               ``"dequant"``: dequantized per call for a
                                                                   float GEMM (not a low-bit GEMM)
=====================  ==========================================  ===========================================

Activations of the w8a8 formats are quantized at run time, either ``act="dynamic"`` (one absmax
scale per token; for fp8, inputs coming out of the FFN's GELU go through the one-pass Triton kernel
of :mod:`diffspeed.kernels.fp8_quant`, the rest through torch ops that Inductor fuses into the norm:
see ``FP8_ACT_KERNEL``) or ``act="static"`` (one per-tensor scale per *timestep group*, from calibration:
a diffusion transformer's activation range moves a lot between the noisy first steps and the clean
last ones, so one static scale for all steps either clips early or wastes resolution late). The
group is ``step_index * G // num_steps`` of the model's :class:`~diffspeed.context.StepContext`: a
Python int, so picking the scale never syncs with the device. Without a step context (a bare call)
the largest scale of the table is used (never clips).

Under torch.compile the Python ints must not reach the graph (dynamo would guard on them and
recompile every step). So :func:`attach_step_group` (what ``ptq_`` uses) gives the layers a shared
0-d int64 *device* tensor holding the group, which a forward pre-hook on the transformer (run
eagerly: ``torch._dynamo.disable``) refreshes from the StepContext with one ``fill_`` when the group
changes: no host sync, no recompile, CUDA-graph safe. The graph indexes the scale table with it.
A layer with no shared group tensor (plain :func:`quantize_linear`) reads the context in Python
(:meth:`QuantLinear.attach_context`): fine in eager mode.

Under ``torch.compile`` the activation quantize step (``x / smooth / scale``, round, clamp, cast) is
elementwise after a row reduction, so inductor fuses it into the kernel that produced ``x`` (the adaLN
norm + modulation, or the GELU of the MLP); what is left per linear is one low-precision GEMM with a
fused epilogue (scale, bias). One exception, for dynamic fp8: after the FFN's GELU, Inductor's fused
reduction over the 4x-wide rows is slow (0.32 ms per DiT-XL/2 block at batch 64, three times the
GELU alone), so that input goes through the one-pass Triton kernel of
:mod:`diffspeed.kernels.fp8_quant` instead, with the GELU moved inside it (``ptq_``'s ``fuse_gelu``).
Whether a format wins depends on the GEMM sizes (measured figures, torchao side by side:
``benchmarks/results/quantization.json``; FP8 at FLUX width 1.35x, on DiT-XL/2 at batch 64 1.16-1.22x,
at batch 1 0.74x). The weight-only formats save memory, not time, at large batch: torch's int4
kernel is a small-M (decode) kernel, hence ``int4_kernel="auto"`` = dequantize (int4 storage, float GEMM) and the tinygemm kernel only where
asked for.

SmoothQuant (see :mod:`diffspeed.quant.smoothquant`): an optional ``smooth`` buffer divides the
input per in-feature while the weight's columns were multiplied by the same factors before
quantization, so ``(x / s) @ (W * s).T == x @ W.T`` in exact arithmetic, with the outliers moved
from the activations (hard to quantize per tensor) into the weights (quantized per channel).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DiffspeedError
from ..kernels.fp8_quant import FP8_MAX, rowwise_fp8, rowwise_fp8_reference

FORMATS: tuple[str, ...] = ("int8_w8a8", "fp8_w8a8", "int8_weight_only", "int4_weight_only")
W8A8_FORMATS: tuple[str, ...] = ("int8_w8a8", "fp8_w8a8")
ACT_MODES: tuple[str, ...] = ("dynamic", "static")
INT4_GROUP_SIZES: tuple[int, ...] = (32, 64, 128, 256)
# fp8 GEMMs accumulate with Hopper's fast (lower-precision) accumulation, as torchao's inference
# configs do: without it the fp8 GEMM loses most of its speed advantage over bf16 on the H100
FP8_FAST_ACCUM = True
# how dynamic fp8 layers quantize their input (a diagnostic switch; fp8_diag.py compares them):
# "op" = diffspeed's one-pass row-wise Triton kernel (kernels/fp8_quant.py); "inductor" = the same math
# as torch ops, which torch.compile fuses into the producer's kernel (good after a norm; a slow
# two-pass looped reduction after the FFN's GELU on wide rows); "auto" = the kernel for GELU-fused
# FFN inputs, torch ops elsewhere (measured best, fp8_diag.json session 5)
FP8_ACT_KERNEL = "auto"
INT8_MAX = 127.0
INT8_CAST_KERNEL = "F.linear(int8 weight cast to the activation dtype: a float GEMM)"
INT4_DEQUANT_KERNEL = "F.linear(int4 weight dequantized to the activation dtype: a float GEMM)"
# int4 kernels: "tinygemm" = torch's int4pack mm (a small-M, decode-style kernel); "dequant" = int4
# storage dequantized per call for a float GEMM (memory saved, speed ~ the float GEMM); "auto" picks
# dequant: a DiT's token count makes M >= 256 even at batch 1, where torch's int4pack kernels fall far
# behind (CUDA: 15x slower than bf16 on DiT-XL/2 at batch 64 in benchmarks/results/quantization.json;
# the CPU one is slower still, by orders of magnitude at a few thousand rows)
INT4_KERNELS: tuple[str, ...] = ("auto", "tinygemm", "dequant")
# buffers that are not weight storage (weight_nbytes leaves them out)
_NON_WEIGHT_BUFFERS = ("bias", "act_scale", "smooth")


# ---- what runs where -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _op_works(op: str, device: str) -> str | None:
    """Run ``op`` once on tiny tensors on ``device``; None if it works, else the error (first line)."""
    dev = torch.device(device)
    try:
        if op == "_int_mm":
            a = torch.ones(32, 32, dtype=torch.int8, device=dev)
            torch._int_mm(a, a.t())
        elif op == "_weight_int8pack_mm":
            x = torch.ones(2, 32, device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
            torch._weight_int8pack_mm(x, torch.ones(16, 32, dtype=torch.int8, device=dev), torch.ones(16, dtype=x.dtype, device=dev))
        elif op == "int4pack_cpu":
            w = torch._convert_weight_to_int4pack_for_cpu(torch.zeros(16, 64, dtype=torch.int32, device=dev), 1)
            sz = torch.ones(2, 16, 2, device=dev)
            torch._weight_int4pack_mm_for_cpu(torch.ones(2, 64, device=dev), w, 32, sz)
        elif op == "int4pack_cuda":
            w = torch._convert_weight_to_int4pack(torch.zeros(16, 64, dtype=torch.uint8, device=dev), 2)
            sz = torch.ones(2, 16, 2, device=dev, dtype=torch.bfloat16)
            torch._weight_int4pack_mm(torch.ones(2, 128, device=dev, dtype=torch.bfloat16), w, 64, sz)
        elif op in ("_scaled_mm", "_scaled_mm_bias"):
            a = torch.ones(16, 16, device=dev).to(torch.float8_e4m3fn)
            bias = torch.ones(16, device=dev, dtype=torch.bfloat16) if op == "_scaled_mm_bias" else None
            torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1, device=dev), scale_b=torch.ones(1, 16, device=dev),
                             bias=bias, out_dtype=torch.bfloat16)
        else:
            return f"unknown op {op}"
    except Exception as exc:  # noqa: BLE001 - any failure means the op cannot run here
        return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return None


def _int4_inner_k_tiles(in_features: int) -> int | None:
    """CUDA tinygemm needs in_features % (inner_k_tiles * 16) == 0 for inner_k_tiles in {8, 4, 2}."""
    for tiles in (8, 4, 2):
        if in_features % (tiles * 16) == 0:
            return tiles
    return None


def resolve_int4_kernel(int4_kernel: str) -> str:
    """"auto" -> "dequant" (see INT4_KERNELS)."""
    if int4_kernel not in INT4_KERNELS:
        raise DiffspeedError(f"int4_kernel must be one of {', '.join(INT4_KERNELS)}, got {int4_kernel!r}")
    return "dequant" if int4_kernel == "auto" else int4_kernel


def unavailable_reasons(fmt: str, device: str | torch.device = "cpu", *, in_features: int | None = None,
                        out_features: int | None = None, group_size: int = 128, act: str = "dynamic",
                        int4_kernel: str = "auto") -> list[str]:
    """Every reason ``fmt`` cannot run on ``device`` (for a layer of the given shape); empty = it can.

    Like xformers' "not supported because:" lists: all reasons at once, not the first one only.
    """
    if fmt not in FORMATS:
        return [f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}"]
    device = torch.device(device)
    dev = str(device) if device.type != "cuda" or device.index is not None else "cuda:0"
    reasons: list[str] = []
    if act not in ACT_MODES:
        reasons.append(f"act must be one of {', '.join(ACT_MODES)}, got {act!r}")
    elif act == "static" and fmt not in W8A8_FORMATS:
        reasons.append(f"act='static' only applies to the w8a8 formats ({', '.join(W8A8_FORMATS)}); "
                       f"{fmt} keeps activations in float")
    if device.type not in ("cpu", "cuda"):
        reasons.append(f"diffspeed's low-bit linears run on cpu or cuda, not {device.type}")
        return reasons
    if device.type == "cuda" and not torch.cuda.is_available():
        reasons.append("the device is cuda but torch.cuda.is_available() is False")
        return reasons
    k, n = in_features, out_features
    if fmt == "int8_w8a8":
        if not hasattr(torch, "_int_mm"):
            reasons.append(f"torch {torch.__version__} has no torch._int_mm")
        elif (err := _op_works("_int_mm", dev)) is not None:
            reasons.append(f"torch._int_mm does not run on {device.type} here: {err}")
        if device.type == "cuda":
            if k is not None and k % 8:
                reasons.append(f"torch._int_mm on CUDA needs in_features to be a multiple of 8, got {k}")
            if n is not None and n % 8:
                reasons.append(f"torch._int_mm on CUDA needs out_features to be a multiple of 8, got {n}")
    elif fmt == "fp8_w8a8":
        if device.type != "cuda":
            reasons.append(f"fp8 (torch._scaled_mm) needs a CUDA GPU with compute capability >= 8.9 (sm89+); "
                           f"the device is {device.type}")
        else:
            cap = torch.cuda.get_device_capability(device)
            if cap < (8, 9):
                reasons.append(f"fp8 needs compute capability >= 8.9 (sm89+), this GPU is sm{cap[0]}{cap[1]}")
            elif (err := _op_works("_scaled_mm", dev)) is not None:
                reasons.append(f"torch._scaled_mm with row-wise scales does not run here: {err}")
        if not hasattr(torch, "float8_e4m3fn"):
            reasons.append(f"torch {torch.__version__} has no float8_e4m3fn dtype")
        if k is not None and k % 16:
            reasons.append(f"torch._scaled_mm needs in_features to be a multiple of 16, got {k}")
        if n is not None and n % 16:
            reasons.append(f"torch._scaled_mm needs out_features to be a multiple of 16, got {n}")
    elif fmt == "int4_weight_only":
        if group_size not in INT4_GROUP_SIZES:
            reasons.append(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
        if k is not None and group_size and k % group_size:
            reasons.append(f"in_features {k} is not divisible by the int4 group size {group_size}")
        if int4_kernel not in INT4_KERNELS:
            reasons.append(f"int4_kernel must be one of {', '.join(INT4_KERNELS)}, got {int4_kernel!r}")
        elif resolve_int4_kernel(int4_kernel) == "dequant":
            if k is not None and k % 2:
                reasons.append(f"int4 storage packs two values per byte: in_features must be even, got {k}")
        elif device.type == "cpu":
            if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
                reasons.append(f"torch {torch.__version__} has no torch._weight_int4pack_mm_for_cpu")
            elif (err := _op_works("int4pack_cpu", dev)) is not None:
                reasons.append(f"torch's CPU int4pack kernel does not run here: {err}")
            if n is not None and n % 16:
                reasons.append(f"the CPU int4pack kernel needs out_features to be a multiple of 16, got {n}")
        else:
            if (err := _op_works("int4pack_cuda", dev)) is not None:
                reasons.append(f"torch._weight_int4pack_mm does not run on this GPU (needs sm80+): {err}")
            if k is not None and _int4_inner_k_tiles(k) is None:
                reasons.append(f"torch._weight_int4pack_mm needs in_features to be a multiple of 32, got {k}")
            if n is not None and n % 8:
                reasons.append(f"torch._weight_int4pack_mm needs out_features to be a multiple of 8, got {n}")
    return reasons


# ---- the module ----------------------------------------------------------------------------------

def _pad_rows(x: torch.Tensor, multiple: int, minimum: int) -> tuple[torch.Tensor, int]:
    m = x.shape[0]
    target = max(minimum, -(-m // multiple) * multiple)
    if target == m:
        return x, m
    return F.pad(x, (0, 0, 0, target - m)), m


class QuantLinear(nn.Module):
    """A quantized replacement for ``nn.Linear`` (build it with :func:`quantize_linear`).

    Buffers: ``qweight`` (int8 ``[N, K]`` / float8 ``[N, K]`` / int4-packed), ``w_scale`` (``[N]`` fp32
    for int8/fp8) or ``scales_and_zeros`` (``[K // group, N, 2]`` for int4), ``bias`` (original
    dtype, optional), ``act_scale`` (``[G + 1]`` fp32, static w8a8 only: the group scales, then their max) and ``smooth`` (``[K]`` fp32,
    SmoothQuant divisor, optional). ``kernel`` names the low-precision op every forward runs.
    """

    def __init__(self, in_features: int, out_features: int, fmt: str, *, act: str = "dynamic",
                 group_size: int = 128, kernel: str = "") -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.fmt = fmt
        self.act = act if fmt in W8A8_FORMATS else "none"
        self.group_size = group_size
        self.kernel = kernel
        self.int4_layout = ""  # "cpu" or "cuda" (tinygemm packed layouts differ) or "dequant" (any device)
        # fp8: the bias goes into _scaled_mm's epilogue (probed at construction) instead of a separate
        # elementwise pass over the (M, N) output
        self.fused_bias = False
        self._ctx: Any = None  # the model's StepContext (static activation scales, eager path)
        self._group: Any = None  # shared holder whose .t is a 0-d int64 device tensor (compile path)
        # "tanh": the input is the FFN's pre-activation; the tanh GELU runs inside the quantization
        # (set by ptq_'s fuse_gelu on dynamic fp8 layers, see diffspeed.quant.act_fusion)
        self.input_gelu = "none"

    # -- context -----------------------------------------------------------------------------------
    def attach_context(self, ctx: Any) -> None:
        """Give the layer the model's StepContext, so static scales follow the timestep group."""
        object.__setattr__(self, "_ctx", ctx)

    def _static_scale(self) -> torch.Tensor:
        table: torch.Tensor = self.act_scale  # G group scales, then their max (entry G: no step context)
        if self._group is not None:
            return table.index_select(0, self._group.t.reshape(1))
        ctx = self._ctx
        g_count = table.shape[0] - 1
        if ctx is not None and ctx.num_steps and 0 <= ctx.step_index < ctx.num_steps:
            g = ctx.step_index * g_count // ctx.num_steps  # python ints: no host sync
            return table[g:g + 1]
        return table[-1:]  # no step context: the largest scale never clips

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.fmt == "int8_w8a8":
            y = self._int8_w8a8(x2)
        elif self.fmt == "fp8_w8a8":
            y = self._fp8_w8a8(x2)
        elif self.fmt == "int8_weight_only":
            y = self._int8_weight_only(x2)
        else:
            y = self._int4(x2)
        if self.bias is not None and not self.fused_bias:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _act_input(self, x2: torch.Tensor, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x / smooth, per-row or per-tensor scale): elementwise, fused by torch.compile upstream."""
        xf = x2.float()
        if self.smooth is not None:
            xf = xf / self.smooth
        if self.act == "static":
            scale = self._static_scale().reshape(1, 1)
        else:
            scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / qmax
        return xf, scale

    def _int8_w8a8(self, x2: torch.Tensor) -> torch.Tensor:
        xf, scale = self._act_input(x2, INT8_MAX)
        xs = (xf / scale).round().clamp(-INT8_MAX, INT8_MAX)
        m = xs.shape[0]
        if xs.is_cuda:  # cuBLASLt int8 GEMM: M > 16 and a multiple of 8 (pad in float, then cast)
            xs, m = _pad_rows(xs, 8, 32 if m <= 16 else 8)
        acc = torch._int_mm(xs.to(torch.int8), self.qweight.t())[:m]
        return acc.float() * (scale * self.w_scale)

    def _fp8_w8a8(self, x2: torch.Tensor) -> torch.Tensor:
        m = x2.shape[0]
        xp, _ = _pad_rows(x2, 16, 16)  # _scaled_mm needs a multiple of 16 rows; zero rows give zero codes
        if self.act == "dynamic":
            use_op = FP8_ACT_KERNEL == "op" or (FP8_ACT_KERNEL == "auto" and self.input_gelu != "none")
            quantize = rowwise_fp8 if use_op else rowwise_fp8_reference
            codes, scale_a = quantize(xp, self.smooth, self.input_gelu)
        else:  # static: one per-tensor scale of the timestep group
            xf, scale = self._act_input(xp, FP8_MAX)
            codes = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            scale_a = scale.expand(xp.shape[0], 1).contiguous()
        bias = self.bias.to(torch.bfloat16) if self.fused_bias else None
        out = torch._scaled_mm(codes, self.qweight.t(), scale_a=scale_a, scale_b=self.w_scale.reshape(1, -1),
                               bias=bias, out_dtype=torch.bfloat16, use_fast_accum=FP8_FAST_ACCUM)
        return out[:m]

    def _int8_weight_only(self, x2: torch.Tensor) -> torch.Tensor:
        if self.kernel == "torch._weight_int8pack_mm":
            xs = x2 if x2.dtype in (torch.float32, torch.bfloat16, torch.float16) else x2.float()
            return torch._weight_int8pack_mm(xs.contiguous(), self.qweight, self.w_scale.to(xs.dtype))
        # int8 -> float cast feeding a float GEMM (weight memory saved; the GEMM is not low-bit)
        return F.linear(x2, self.qweight.to(x2.dtype)) * self.w_scale.to(x2.dtype)

    def _int4_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """Dequantize the "dequant" layout: uint8 ``[N, K/2]`` (high nibble = even column) with
        ``(q - 8) * scale + zero`` per group. Elementwise only, so under torch.compile it is one fused
        kernel writing the float weight that the GEMM reads."""
        packed = self.qweight
        q = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(self.out_features, -1, self.group_size)
        sz = self.scales_and_zeros.float()  # [K/g, N, 2]
        scale = sz[..., 0].t().unsqueeze(-1)
        zero = sz[..., 1].t().unsqueeze(-1)
        w = (q.float() - 8.0) * scale + zero
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def _int4(self, x2: torch.Tensor) -> torch.Tensor:
        sz = self.scales_and_zeros
        if self.int4_layout == "dequant":
            return F.linear(x2, self._int4_weight(x2.dtype))
        if self.int4_layout == "cuda":
            return torch._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), self.qweight, self.group_size, sz)
        return torch._weight_int4pack_mm_for_cpu(x2.to(sz.dtype).contiguous(), self.qweight, self.group_size, sz)

    # -- inspection --------------------------------------------------------------------------------
    def dequantized_weight(self) -> torch.Tensor:
        """The float ``[N, K]`` weight this layer multiplies by (smoothing folded back out). For tests."""
        if self.fmt in ("int8_w8a8", "int8_weight_only", "fp8_w8a8"):
            w = self.qweight.float() * self.w_scale.float()[:, None]
        elif self.int4_layout == "dequant":
            w = self._int4_weight(torch.float32)
        else:
            eye = torch.eye(self.in_features, device=self.qweight.device)
            w = self._int4(eye).float().t().contiguous()
        if self.smooth is not None:
            w = w / self.smooth[None, :]
        return w

    def extra_repr(self) -> str:
        extra = f", group_size={self.group_size}" if self.fmt == "int4_weight_only" else ""
        smooth = ", smooth=True" if self.smooth is not None else ""
        gelu = f", input_gelu={self.input_gelu}" if self.input_gelu != "none" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"act={self.act}{extra}{smooth}{gelu}, kernel={self.kernel}")


class _GroupHolder:
    """Holds the shared step-group tensor (a plain object: ``model.to()`` leaves the sharing intact)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t
        self.last = -1


def attach_step_group(model: nn.Module, layers: list["QuantLinear"], ctx: Any) -> Any:
    """Make the static-scale ``layers`` of ``model`` read their timestep group from one shared device
    tensor, refreshed before each forward of ``model`` from ``ctx`` (see the module doc). Returns the
    hook handle (``remove()`` detaches nothing else; the layers then fall back to the largest scale)."""
    layers = [q for q in layers if q.act == "static"]
    if not layers:
        return None
    device = layers[0].act_scale.device
    holder = _GroupHolder(torch.zeros((), dtype=torch.int64, device=device))
    num_groups = {q.act_scale.numel() - 1 for q in layers}
    if len(num_groups) != 1:
        raise DiffspeedError(f"the static layers have different numbers of timestep groups: {sorted(num_groups)}")
    g_count = num_groups.pop()
    holder.t.fill_(g_count)
    holder.last = g_count
    for q in layers:
        q.attach_context(ctx)
        object.__setattr__(q, "_group", holder)
    probe = layers[0]

    @torch._dynamo.disable
    def _refresh(module: nn.Module, args: tuple, kwargs: dict) -> None:
        n = ctx.num_steps
        g = ctx.step_index * g_count // n if n and 0 <= ctx.step_index < n else g_count
        dev = probe.act_scale.device
        if holder.t.device != dev:  # the model moved
            holder.t = holder.t.to(dev)
            holder.last = -1
        if g != holder.last:
            holder.t.fill_(g)  # a tiny device-side fill, no host sync
            holder.last = g

    return model.register_forward_pre_hook(_refresh, with_kwargs=True)


# ---- quantizers ----------------------------------------------------------------------------------

def _int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / INT8_MAX
    q = (w / scale[:, None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale.float()


def _int4_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric groupwise int4 in torch's tinygemm convention: ``w ~ (q - 8) * scale + zero``."""
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    lo = g.amin(dim=-1)
    hi = g.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp_min(1e-12)
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8.0 * scale
    scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous()  # [K/g, N, 2]
    return q, scales_and_zeros


def _kernel_for(fmt: str, device: torch.device, int4_kernel: str = "auto") -> str:
    dev = str(device) if device.type != "cuda" or device.index is not None else "cuda:0"
    if fmt == "int8_w8a8":
        return "torch._int_mm"
    if fmt == "fp8_w8a8":
        return "torch._scaled_mm"
    if fmt == "int8_weight_only":
        # CUDA: torch._weight_int8pack_mm is a small-M (decode) kernel, far slower than bf16 at large M in
        # an H100 probe; the int8 weights are cast for a bf16 GEMM instead (memory saved, no low-bit GEMM)
        if device.type != "cuda" and hasattr(torch, "_weight_int8pack_mm") \
                and _op_works("_weight_int8pack_mm", dev) is None:
            return "torch._weight_int8pack_mm"
        return INT8_CAST_KERNEL
    if resolve_int4_kernel(int4_kernel) == "dequant":
        return INT4_DEQUANT_KERNEL
    return "torch._weight_int4pack_mm" if device.type == "cuda" else "torch._weight_int4pack_mm_for_cpu"


@torch.no_grad()
def quantize_linear(linear: nn.Linear, fmt: str, *, act: str = "dynamic", act_scales: torch.Tensor | None = None,
                    smooth: torch.Tensor | None = None, group_size: int = 128, int4_kernel: str = "auto",
                    hessian: torch.Tensor | None = None, gptq_damp: float = 0.01) -> QuantLinear:
    """A :class:`QuantLinear` computing ``linear`` in ``fmt`` (raises DiffspeedError with every reason
    the format cannot run here). ``int4_kernel``: see :data:`INT4_KERNELS`.

    ``hessian``: the layer's input second moment ``E[x x^T]`` (``[K, K]``, of the raw input): the
    weights are then rounded with GPTQ's error feedback (:mod:`diffspeed.quant.gptq`) instead of to
    nearest; int4 and int8 formats only.

    ``act="static"`` (w8a8 only) needs ``act_scales``: a ``(G,)`` table of per-tensor activation scales
    (absmax / qmax of the, smoothed, input) per timestep group. ``smooth``: per-in-feature SmoothQuant
    factors ``s``; the weight is quantized as ``W * s`` and the input divided by ``s`` at run time.
    """
    if not isinstance(linear, nn.Linear):
        raise DiffspeedError(f"quantize_linear needs an nn.Linear, got {type(linear).__name__}")
    weight = linear.weight
    if type(weight) not in (torch.Tensor, nn.Parameter):
        raise DiffspeedError(f"quantize_linear: the weight is already a {type(weight).__name__} (quantized?)")
    device = weight.device
    n, k = weight.shape
    reasons = unavailable_reasons(fmt, device, in_features=k, out_features=n, group_size=group_size, act=act,
                                  int4_kernel=int4_kernel)
    if reasons:
        raise DiffspeedError(f"format {fmt!r} cannot run on {device.type} for a {k}->{n} linear: " + "; ".join(reasons))
    if act == "static" and fmt in W8A8_FORMATS:
        if act_scales is None:
            raise DiffspeedError("act='static' needs act_scales (a per-timestep-group scale table from calibration)")
        act_scales = torch.as_tensor(act_scales).detach().float().reshape(-1)
        if act_scales.numel() == 0 or not torch.isfinite(act_scales).all() or (act_scales <= 0).any():
            raise DiffspeedError("act_scales must be a non-empty table of finite positive scales")
    if smooth is not None:
        if fmt not in W8A8_FORMATS:
            raise DiffspeedError(f"SmoothQuant factors only apply to w8a8 formats, not {fmt}")
        smooth = torch.as_tensor(smooth).detach().float().reshape(-1).to(device)
        if smooth.numel() != k or not torch.isfinite(smooth).all() or (smooth <= 0).any():
            raise DiffspeedError(f"smooth must hold {k} finite positive factors (one per in-feature)")

    w = weight.detach().float()
    if smooth is not None:
        w = w * smooth[None, :]
    if hessian is not None:
        from .gptq import GPTQ_FORMATS

        if fmt not in GPTQ_FORMATS:
            raise DiffspeedError(f"GPTQ rounding supports {', '.join(GPTQ_FORMATS)}, not {fmt}")
        hessian = torch.as_tensor(hessian).detach().float().to(device)
        if tuple(hessian.shape) != (k, k) or not torch.isfinite(hessian).all():
            raise DiffspeedError(f"hessian must be a finite [{k}, {k}] matrix, got {tuple(hessian.shape)}")
        if smooth is not None:  # the GEMM sees x / s: its second moment is H / (s s^T)
            hessian = hessian / smooth[:, None] / smooth[None, :]
    ql = QuantLinear(k, n, fmt, act=act, group_size=group_size, kernel=_kernel_for(fmt, device, int4_kernel))
    if fmt in ("int8_w8a8", "int8_weight_only"):
        if hessian is not None:
            from .gptq import gptq_int8_rows

            q, scale = gptq_int8_rows(w, hessian, gptq_damp)
        else:
            q, scale = _int8_rows(w)
        ql.register_buffer("qweight", q.contiguous())
        ql.register_buffer("w_scale", scale if fmt == "int8_w8a8" else scale.to(weight.dtype))
    elif fmt == "fp8_w8a8":
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
        ql.register_buffer("qweight", (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).contiguous())
        ql.register_buffer("w_scale", scale.float())
    else:
        if hessian is not None:
            from .gptq import gptq_int4

            q, sz = gptq_int4(w, hessian, group_size, gptq_damp)
        else:
            q, sz = _int4_groups(w, group_size)
        packed_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()  # high nibble = even column
        float_dtype = weight.dtype if weight.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        if resolve_int4_kernel(int4_kernel) == "dequant":
            ql.register_buffer("qweight", packed_u8)
            ql.register_buffer("scales_and_zeros", sz.to(float_dtype))
            ql.int4_layout = "dequant"
        elif device.type == "cuda":
            ql.register_buffer("qweight", torch._convert_weight_to_int4pack(packed_u8, _int4_inner_k_tiles(k)))
            ql.register_buffer("scales_and_zeros", sz.to(torch.bfloat16))
            ql.int4_layout = "cuda"
        else:  # the CPU kernel packs from the unpacked [N, K] int32 codes
            ql.register_buffer("qweight", torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1))
            ql.register_buffer("scales_and_zeros", sz.to(float_dtype))
            ql.int4_layout = "cpu"
    ql.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
    ql.fused_bias = (fmt == "fp8_w8a8" and linear.bias is not None and device.type == "cuda"
                     and _op_works("_scaled_mm_bias", str(device)) is None)
    # static: the G group scales plus their max as entry G (the no-step-context fallback), so that
    # picking a scale is one index on the hot path
    table = torch.cat([act_scales, act_scales.amax().reshape(1)]) if ql.act == "static" else None
    ql.register_buffer("act_scale", table.to(device) if table is not None else None)
    ql.register_buffer("smooth", smooth)
    return ql


def weight_nbytes(module: nn.Module) -> int:
    """Bytes of weight storage of a linear layer (``nn.Linear`` weight, or a :class:`QuantLinear`'s
    quantized weight plus its scales / zeros); bias, activation scales and smoothing factors excluded."""
    if isinstance(module, QuantLinear):
        return sum(b.numel() * b.element_size() for name, b in module.named_buffers(recurse=False)
                   if b is not None and name not in _NON_WEIGHT_BUFFERS)
    if isinstance(module, nn.Linear):
        w = module.weight
        if type(w) not in (torch.Tensor, nn.Parameter) and hasattr(w, "__tensor_flatten__"):
            names = w.__tensor_flatten__()[0]
            return sum(getattr(w, n).numel() * getattr(w, n).element_size() for n in names
                       if isinstance(getattr(w, n, None), torch.Tensor))
        return w.numel() * w.element_size()
    return sum(weight_nbytes(m) for m in module.children())  # any other module: its linears


__all__ = [
    "FORMATS",
    "QuantLinear",
    "W8A8_FORMATS",
    "attach_step_group",
    "quantize_linear",
    "unavailable_reasons",
    "weight_nbytes",
]
