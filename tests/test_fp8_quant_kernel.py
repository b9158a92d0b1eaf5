"""The one-pass row-wise fp8 activation quantizer and ptq_'s GELU fusion.

On CPU, ptq_ refuses fp8 (no fp8 GEMM here), so the fusion tests patch the availability check and run
``torch._scaled_mm``'s CPU reference: that is enough to check the rewrite is exact. The Triton kernel
itself is checked against the torch reference on CUDA only.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffspeed.errors import DiffspeedError
from diffspeed.kernels.fp8_quant import rowwise_fp8, rowwise_fp8_reference
from diffspeed.methods import ptq as ptq_mod
from diffspeed.methods.ptq import PTQConfig, load_ptq_, ptq_model_, save_ptq
from diffspeed.quant import formats
from diffspeed.quant.act_fusion import ProjOnly
from diffspeed.quant.formats import QuantLinear
from method_tester import load_tiny


def test_reference_rounds_to_fp8_and_scales_rows():
    torch.manual_seed(0)
    x = torch.randn(8, 96) * torch.logspace(-2, 2, 8)[:, None]
    codes, scale = rowwise_fp8(x, None, "none")
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (8, 1)
    # every row uses the full e4m3 range: its largest code is +-448
    torch.testing.assert_close(codes.float().abs().amax(dim=1), torch.full((8,), 448.0))
    deq = codes.float() * scale
    rel = ((deq - x).norm(dim=1) / x.norm(dim=1)).max()
    assert 0 < rel < 0.05  # it really rounds (not a float copy), and e4m3's 3 mantissa bits bound the error
    # gelu="tanh" equals quantizing the tanh GELU of the input
    g_codes, g_scale = rowwise_fp8(x, None, "tanh")
    ref_codes, ref_scale = rowwise_fp8_reference(torch.nn.functional.gelu(x, approximate="tanh"), None, "none")
    torch.testing.assert_close(g_scale, ref_scale)
    assert torch.equal(g_codes.float(), ref_codes.float())


def test_bad_gelu_mode_is_refused():
    with pytest.raises(ValueError, match="gelu must be one of"):
        rowwise_fp8(torch.randn(4, 16), None, "erf")


def test_compiles_without_graph_break():
    x = torch.randn(32, 64)
    f = torch.compile(lambda t: rowwise_fp8(t, None, "tanh")[1], backend="eager", fullgraph=True)
    torch.testing.assert_close(f(x), rowwise_fp8(x, None, "tanh")[1])


@pytest.fixture
def fp8_on_cpu(monkeypatch):
    """Let ptq_ build fp8 layers on CPU (torch._scaled_mm's CPU reference runs them)."""
    try:
        a = torch.ones(16, 16).to(torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"this torch has no CPU torch._scaled_mm: {str(exc).splitlines()[0]}")
    real = formats.unavailable_reasons

    def patched(fmt, device="cpu", **kw):
        return [] if fmt == "fp8_w8a8" else real(fmt, device, **kw)

    monkeypatch.setattr(formats, "unavailable_reasons", patched)
    monkeypatch.setattr(ptq_mod, "unavailable_reasons", patched)


def _forward(model, loaded, seed=0):
    torch.manual_seed(seed)
    kwargs = dict(loaded.make_condition([1, 2], torch.device("cpu")).cond)
    x = torch.randn(2, *loaded.latent_shape)
    t = torch.tensor([700.0, 300.0])
    with torch.no_grad():
        return model(hidden_states=x, timestep=t, **kwargs, return_dict=False)[0]


def test_gelu_fusion_is_exact_and_rewrites_every_ffn(fp8_on_cpu):
    plain_loaded = load_tiny("reference-image")
    plain = plain_loaded.transformer
    ptq_model_(plain, PTQConfig(format="fp8_w8a8", fuse_gelu=False))
    fused_loaded = load_tiny("reference-image")
    fused = fused_loaded.transformer
    report = ptq_model_(fused, PTQConfig(format="fp8_w8a8"))
    ffns = [f for f, m in fused.named_modules() if type(m).__name__ == "FeedForward"]
    assert ffns and len(report.fused_gelu) == len(ffns)
    assert all(isinstance(fused.get_submodule(f), ProjOnly) for f in report.fused_gelu)
    assert sum(isinstance(m, QuantLinear) and m.input_gelu == "tanh" for m in fused.modules()) == len(ffns)
    assert not any(isinstance(m, ProjOnly) for m in plain.modules())
    # fp32 model: the GELU is computed in fp32 either way, so fused and unfused agree exactly
    out_plain, out_fused = _forward(plain, plain_loaded), _forward(fused, fused_loaded)
    assert torch.equal(out_plain, out_fused)
    # and the fp8 path really changed the output vs the float model (it is not a no-op)
    ref_loaded = load_tiny("reference-image")
    assert not torch.allclose(_forward(ref_loaded.transformer, ref_loaded), out_fused, atol=1e-4)


def test_gelu_fusion_survives_save_and_load(fp8_on_cpu, tmp_path):
    loaded = load_tiny("reference-image")
    ptq_model_(loaded.transformer, PTQConfig(format="fp8_w8a8"))
    out = _forward(loaded.transformer, loaded)
    save_ptq(loaded.transformer, tmp_path / "q")
    fresh = load_tiny("reference-image")
    report = load_ptq_(fresh.transformer, tmp_path / "q")
    assert report.fused_gelu
    assert torch.equal(_forward(fresh.transformer, fresh), out)


def test_fusion_skips_non_tanh_gelu_and_nonzero_dropout(fp8_on_cpu):
    from diffspeed.quant.act_fusion import fuse_gelu_into_fp8_

    class GELU(nn.Module):  # named like diffusers' GELU, which the rewrite recognises
        def __init__(self, approximate):
            super().__init__()
            self.proj, self.approximate = nn.Linear(32, 64), approximate

        def forward(self, x):
            return nn.functional.gelu(self.proj(x), approximate=self.approximate)

    def ffn(approximate, p):
        m = nn.Module()
        fc2 = formats.quantize_linear(nn.Linear(64, 32), "fp8_w8a8")
        m.net = nn.ModuleList([GELU(approximate), nn.Dropout(p), fc2])
        return m

    root = nn.Module()
    root.a, root.b, root.c = ffn("tanh", 0.0), ffn("none", 0.0), ffn("tanh", 0.1)
    assert fuse_gelu_into_fp8_(root) == ["a.net.0"]
    assert fuse_gelu_into_fp8_(root) == []  # idempotent: nothing left to fuse


def test_fuse_gelu_must_be_bool():
    with pytest.raises(DiffspeedError, match="fuse_gelu"):
        PTQConfig(format="fp8_w8a8", fuse_gelu="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(16384, 4608), (1000, 1152), (3, 3072)])
@pytest.mark.parametrize("gelu", ["none", "tanh"])
def test_cuda_kernel_matches_reference(shape, gelu):
    torch.manual_seed(0)
    x = (torch.randn(*shape, device="cuda") * 3).to(torch.bfloat16)
    smooth = torch.rand(shape[1], device="cuda") + 0.5
    for s in (None, smooth):
        codes, scale = rowwise_fp8(x, s, gelu)
        ref_codes, ref_scale = rowwise_fp8_reference(x, s, gelu)
        torch.testing.assert_close(scale, ref_scale, rtol=1e-5, atol=0)
        # codes may differ by one e4m3 step where the fp32 math rounds differently
        diff = (codes.float() - ref_codes.float()).abs() / ref_codes.float().abs().clamp_min(1.0)
        assert float(diff.max()) <= 0.13 and float((diff > 0).float().mean()) < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("path", ["auto", "op"])
def test_cuda_fp8_layer_compiles_in_one_graph(monkeypatch, path):
    """The Triton op must not break the graph (a break per layer made compiled DiTs slower than bf16)."""
    if formats.unavailable_reasons("fp8_w8a8", "cuda", in_features=4608, out_features=1152):
        pytest.skip("no fp8 on this GPU")
    monkeypatch.setattr(formats, "FP8_ACT_KERNEL", path)
    torch.manual_seed(0)
    ql = formats.quantize_linear(nn.Linear(4608, 1152).cuda().to(torch.bfloat16), "fp8_w8a8")
    ql.input_gelu = "tanh"
    x = torch.randn(256, 4608, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = ql(x)
        torch._dynamo.reset()
        compiled = torch.compile(ql, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
    ref = nn.functional.linear(nn.functional.gelu(x.float(), approximate="tanh"), ql.dequantized_weight().float(),
                               ql.bias.float())
    assert float((eager.float() - ref).norm() / ref.norm()) < 0.05


@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_fp8_layer_pads_rows_and_matches_its_reference_math(fp8_on_cpu, act):
    """5 rows (padded to 16 for _scaled_mm, sliced back): the output equals the fp8-rounded input times
    the dequantized weight, for per-row (dynamic) and per-tensor (static) activation scales."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(5, 64)
    scales = torch.tensor([0.02, 0.03]) if act == "static" else None
    ql = formats.quantize_linear(lin, "fp8_w8a8", act=act, act_scales=scales)
    out = ql(x)
    s = x.abs().amax(dim=1, keepdim=True) / 448.0 if act == "dynamic" else torch.tensor([[0.03]])  # no context: max
    xq = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    ref = xq @ ql.dequantized_weight().float().t() + lin.bias
    assert out.shape == (5, 32)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)  # bf16 GEMM output
    assert not torch.allclose(out, lin(x), atol=1e-3)  # the input really was rounded to fp8
