"""diffspeed.quant.formats / smoothquant: low-bit linears on real kernels (CPU checks)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffspeed.errors import DiffspeedError
from diffspeed.quant.formats import FORMATS, QuantLinear, quantize_linear, unavailable_reasons, weight_nbytes
from diffspeed.quant.smoothquant import smooth_factors

KERNELS = {
    "int8_w8a8": ("torch._int_mm",),
    "fp8_w8a8": ("torch._scaled_mm",),
    "int8_weight_only": ("torch._weight_int8pack_mm", "F.linear(int8 weight cast to the activation dtype: a float GEMM)"),
    "int4_weight_only": ("torch._weight_int4pack_mm_for_cpu",
                         "F.linear(int4 weight dequantized to the activation dtype: a float GEMM)"),
}
MAX_REL = {"int8_w8a8": 0.02, "fp8_w8a8": 0.05, "int8_weight_only": 0.01, "int4_weight_only": 0.12}


def _layer(k: int = 256, n: int = 192) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(k, n)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_linear_close_but_really_quantized(fmt):
    lin = _layer()
    x = torch.randn(3, 40, 256)
    reasons = unavailable_reasons(fmt, "cpu", in_features=256, out_features=192, group_size=64)
    if reasons:
        assert fmt == "fp8_w8a8", f"{fmt} should run on CPU here: {reasons}"
        with pytest.raises(DiffspeedError, match="sm89"):
            quantize_linear(lin, fmt)
        return
    q = quantize_linear(lin, fmt, group_size=64)
    assert isinstance(q, QuantLinear) and q.kernel in KERNELS[fmt]
    with torch.no_grad():
        ref, out = lin(x), q(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = _rel(out, ref)
    assert 0 < err < MAX_REL[fmt], f"{fmt}: relative error {err:.4g}"
    w = q.dequantized_weight()
    assert not torch.equal(w, lin.weight.detach())
    if fmt == "int4_weight_only":
        groups = w.reshape(192, 256 // 64, 64)
        assert max(len(torch.unique(g)) for row in groups for g in row) <= 16
        assert q.qweight.dtype == torch.uint8
    else:
        assert max(len(torch.unique(row)) for row in w) <= 256
        assert q.qweight.dtype == torch.int8
    assert weight_nbytes(q) < weight_nbytes(lin) / 3


def test_w8a8_matmul_runs_in_int8(monkeypatch):
    q = quantize_linear(_layer(), "int8_w8a8")
    seen = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: (seen.append((a.dtype, b.dtype)), real(a, b))[1])
    q(torch.randn(5, 256))
    assert seen == [(torch.int8, torch.int8)]


def test_fp8_refused_on_cpu_with_reasons():
    reasons = unavailable_reasons("fp8_w8a8", "cpu", in_features=100, out_features=192)
    assert any("sm89" in r for r in reasons)
    assert any("multiple of 16" in r for r in reasons)  # every reason, not just the first
    assert unavailable_reasons("int8_w8a8", "cpu") == []
    assert "unknown format" in unavailable_reasons("int3", "cpu")[0]


def test_int4_refusals_and_size():
    assert any("not divisible" in r for r in unavailable_reasons("int4_weight_only", "cpu", in_features=192, group_size=128))
    assert any("group_size" in r for r in unavailable_reasons("int4_weight_only", "cpu", group_size=100))
    with pytest.raises(DiffspeedError, match="not divisible"):
        quantize_linear(_layer(192), "int4_weight_only", group_size=128)
    big = nn.Linear(1152, 1152).to(torch.bfloat16)
    q = quantize_linear(big, "int4_weight_only")
    assert weight_nbytes(big) / weight_nbytes(q) >= 3.5
    x = torch.randn(4, 1152, dtype=torch.bfloat16)
    assert 0 < _rel(q(x).float(), big(x).float()) < 0.12


def test_int4_dequant_kernel_same_math_as_tinygemm_and_really_4bit():
    """The "dequant" int4 layout (two values per byte, float GEMM) computes the same weights as the
    tinygemm layout, stores them in 4 bits, and is what "auto" picks."""
    from diffspeed.quant.formats import INT4_DEQUANT_KERNEL, resolve_int4_kernel

    lin = _layer()
    x = torch.randn(7, 256)
    tiny = quantize_linear(lin, "int4_weight_only", group_size=64, int4_kernel="tinygemm")
    deq = quantize_linear(lin, "int4_weight_only", group_size=64, int4_kernel="dequant")
    assert deq.kernel == INT4_DEQUANT_KERNEL and deq.int4_layout == "dequant"
    assert deq.qweight.dtype == torch.uint8 and deq.qweight.shape == (192, 128)
    w = deq.dequantized_weight()
    assert torch.allclose(w, tiny.dequantized_weight(), atol=1e-6)
    assert max(len(torch.unique(g)) for row in w.reshape(192, 4, 64) for g in row) <= 16
    with torch.no_grad():
        assert torch.allclose(deq(x), tiny(x), atol=1e-4)
        assert 0 < _rel(deq(x), lin(x)) < MAX_REL["int4_weight_only"]
    big = nn.Linear(1152, 1152).to(torch.bfloat16)
    assert weight_nbytes(big) / weight_nbytes(quantize_linear(big, "int4_weight_only", int4_kernel="dequant")) >= 3.5
    assert resolve_int4_kernel("auto") == "dequant" and resolve_int4_kernel("tinygemm") == "tinygemm"
    with pytest.raises(DiffspeedError, match="int4_kernel"):
        quantize_linear(lin, "int4_weight_only", int4_kernel="fast")


def test_static_scales_follow_timestep_group():
    lin = _layer()
    x = torch.randn(8, 256)
    absmax = float(x.abs().max())
    table = torch.tensor([absmax, 4 * absmax, 16 * absmax]) / 127
    q = quantize_linear(lin, "int8_w8a8", act="static", act_scales=table)
    with torch.no_grad():
        no_ctx = q(x)  # no step context: the largest scale
        ctx = SimpleNamespace(step_index=0, num_steps=6)
        q.attach_context(ctx)
        outs = []
        for step in (0, 2, 4, 5):
            ctx.step_index = step
            outs.append(q(x))
        ref = lin(x)
    assert not torch.equal(outs[0], outs[1])  # steps 0 and 2: groups 0 and 1
    assert torch.equal(outs[2], outs[3])  # steps 4 and 5 are both in group 2
    assert torch.equal(outs[2], no_ctx)
    assert _rel(outs[0], ref) < _rel(outs[2], ref)  # the tight scale is the most precise
    with pytest.raises(DiffspeedError, match="act_scales"):
        quantize_linear(lin, "int8_w8a8", act="static")
    with pytest.raises(DiffspeedError, match="static"):
        quantize_linear(lin, "int8_weight_only", act="static", act_scales=table)


def test_smoothquant_reduces_w8a8_error_with_outlier_channels():
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    x = torch.randn(64, 256)
    x[:, [3, 50, 200]] *= 60.0  # outlier input channels, as after adaLN modulation
    with torch.no_grad():
        ref = lin(x)
        act = x.abs().amax(0)
        table = (x.abs().max() / 127).reshape(1)
        plain = quantize_linear(lin, "int8_w8a8", act="static", act_scales=table)(x)
        s = smooth_factors(act, lin.weight, alpha=0.5)
        stable = ((x / s).abs().max() / 127).reshape(1)
        smoothed = quantize_linear(lin, "int8_w8a8", act="static", act_scales=stable, smooth=s)(x)
    e_plain, e_smooth = _rel(plain, ref), _rel(smoothed, ref)
    assert e_smooth < 0.5 * e_plain, (e_plain, e_smooth)
    assert e_smooth > 0


def test_smooth_factors_checks():
    w = torch.randn(8, 4)
    s = smooth_factors(torch.tensor([1.0, 0.0, 4.0, 2.0]), w)
    assert s.shape == (4,) and torch.isfinite(s).all() and (s > 0).all()
    with pytest.raises(DiffspeedError, match=r"\[0, 1\]"):
        smooth_factors(torch.ones(4), w, alpha=1.5)
    with pytest.raises(DiffspeedError, match="channels"):
        smooth_factors(torch.ones(5), w)
    with pytest.raises(DiffspeedError, match="positive"):
        quantize_linear(nn.Linear(4, 16), "int8_w8a8", smooth=torch.zeros(4))


def test_weight_nbytes_and_bad_inputs():
    lin = _layer()
    assert weight_nbytes(lin) == 256 * 192 * 4
    seq = nn.Sequential(lin, nn.ReLU(), nn.Linear(192, 16))
    assert weight_nbytes(seq) == 256 * 192 * 4 + 192 * 16 * 4
    with pytest.raises(DiffspeedError, match="nn.Linear"):
        quantize_linear(nn.Conv1d(2, 2, 1), "int8_w8a8")  # type: ignore[arg-type]
    with pytest.raises(DiffspeedError, match="unknown format"):
        quantize_linear(lin, "int2")


def test_step_group_tensor_no_recompiles():
    """ptq_'s path: the group comes from a shared device tensor, so a compiled graph serves every step."""
    from torch._dynamo.utils import counters

    from diffspeed.quant.formats import attach_step_group

    lin = _layer()
    table = torch.tensor([1.0, 2.0, 4.0, 8.0]) / 127
    q = quantize_linear(lin, "int8_w8a8", act="static", act_scales=table)
    eager = quantize_linear(lin, "int8_w8a8", act="static", act_scales=table)
    ctx = SimpleNamespace(step_index=-1, num_steps=8)
    eager.attach_context(ctx)
    model = nn.Sequential(q)
    hook = attach_step_group(model, [q], ctx)
    assert hook is not None
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(16, 256)
    outs = []
    with torch.no_grad():
        for step in [*range(8), -1]:
            ctx.step_index = step
            out = compiled(x)
            assert torch.equal(out, eager(x)), step
            outs.append(out)
    assert not torch.equal(outs[0], outs[7])  # groups 0 and 3
    assert torch.equal(outs[8], outs[7])  # no step: the largest scale (group 3 here)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch._dynamo.reset()


CUDA_KERNELS = {
    "int8_w8a8": "torch._int_mm",
    "fp8_w8a8": "torch._scaled_mm",
    "int8_weight_only": None,  # torch._weight_int8pack_mm where this torch has it on CUDA
    "int4_weight_only": "torch._weight_int4pack_mm",
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [5, 300])
def test_cuda_formats(fmt, rows):
    if unavailable_reasons(fmt, "cuda", in_features=1152, out_features=1152):
        pytest.skip("; ".join(unavailable_reasons(fmt, "cuda", in_features=1152, out_features=1152)))
    torch.manual_seed(0)
    lin = nn.Linear(1152, 1152).cuda().to(torch.bfloat16)
    x = torch.randn(rows, 1152, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = lin(x).float()
        q = quantize_linear(lin, fmt, **({"int4_kernel": "tinygemm"} if fmt == "int4_weight_only" else {}))
        out = q(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 1152)
    assert CUDA_KERNELS[fmt] in (None, q.kernel)
    err = _rel(out.float(), ref)
    assert 0 < err < MAX_REL[fmt], f"{fmt}: {err:.4g}"
    if fmt in ("int8_w8a8", "fp8_w8a8"):
        qmax = 127 if fmt == "int8_w8a8" else 448
        s = torch.rand(1152, device="cuda") + 0.5
        table = ((x.float() / s).abs().max() / qmax).reshape(1).repeat(3)
        with torch.no_grad():
            out_s = quantize_linear(lin, fmt, act="static", act_scales=table, smooth=s)(x)
        assert 0 < _rel(out_s.float(), ref) < 2 * MAX_REL[fmt]
    if fmt == "int4_weight_only":
        assert weight_nbytes(lin) / weight_nbytes(q) >= 3.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_int4_auto_is_dequant_and_compiles():
    torch.manual_seed(0)
    lin = nn.Linear(1152, 4608).cuda().to(torch.bfloat16)
    x = torch.randn(2, 256, 1152, device="cuda", dtype=torch.bfloat16)
    q = quantize_linear(lin, "int4_weight_only")
    tiny = quantize_linear(lin, "int4_weight_only", int4_kernel="tinygemm")
    assert q.int4_layout == "dequant"
    with torch.no_grad():
        eager = q(x)
        compiled = torch.compile(q, fullgraph=True)(x)
        assert _rel(eager.float(), tiny(x).float()) < 1e-2
    assert _rel(compiled.float(), eager.float()) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_w8a8_compiles():
    torch.manual_seed(0)
    lin = nn.Linear(1152, 4608).cuda().to(torch.bfloat16)
    x = torch.randn(2, 256, 1152, device="cuda", dtype=torch.bfloat16)
    q = quantize_linear(lin, "int8_w8a8")
    with torch.no_grad():
        eager = q(x)
        compiled = torch.compile(q, fullgraph=True)(x)
    assert _rel(compiled.float(), eager.float()) < 1e-2
