"""GPTQ error-compensating rounding for ptq_ (diffspeed.quant.gptq)."""

from __future__ import annotations

import math

import pytest
import torch

import diffspeed
from diffspeed.errors import DiffspeedError
from diffspeed.methods.ptq import PTQConfig, load_ptq_, ptq_gptq_, ptq_model_, save_ptq
from diffspeed.quant.formats import QuantLinear, _int4_groups, _int8_rows, quantize_linear
from diffspeed.quant.gptq import collect_hessians, gptq_int4, gptq_int8_rows
from diffspeed.sampler import sample
from method_tester import load_tiny

STEPS = 10
SEEDS, LABELS = [3, 4], [5, 6]


def _correlated_inputs(n: int = 2048, k: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / math.sqrt(k)
    return torch.randn(n, 8, generator=g) @ torch.randn(8, k, generator=g) + 0.3 * torch.randn(n, k, generator=g) @ mix


def _dequant_int4(q: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    n, k = q.shape
    scale = sz[..., 0].t().repeat_interleave(group, dim=1)
    zero = sz[..., 1].t().repeat_interleave(group, dim=1)
    return (q.float() - 8) * scale + zero


def test_gptq_int4_beats_round_to_nearest_on_the_layer_output():
    torch.manual_seed(0)
    x = _correlated_inputs()
    w = torch.randn(48, 64)
    h = x.t() @ x / x.shape[0]
    q, sz = gptq_int4(w, h, 16)
    assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) <= 15
    wq = _dequant_int4(q, sz, 16)
    rq, rsz = _int4_groups(w, 16)
    wr = _dequant_int4(rq, rsz, 16)
    err_gptq = float((x @ (w - wq).t()).norm())
    err_rtn = float((x @ (w - wr).t()).norm())
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)
    assert not torch.equal(q, rq)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """H = I: no column's error is correlated with another's, so there is nothing to feed back."""
    torch.manual_seed(1)
    w = torch.randn(32, 64)
    q, sz = gptq_int4(w, torch.eye(64), 32)
    rq, rsz = _int4_groups(w, 32)
    assert torch.equal(q, rq)
    assert torch.allclose(sz, rsz)
    q8, s8 = gptq_int8_rows(w, torch.eye(64))
    r8, rs8 = _int8_rows(w)
    assert torch.equal(q8, r8) and torch.allclose(s8, rs8)


def test_gptq_int8_beats_round_to_nearest():
    torch.manual_seed(2)
    x = _correlated_inputs(k=96)
    w = torch.randn(40, 96)
    q8, s8 = gptq_int8_rows(w, x.t() @ x / x.shape[0])
    r8, rs8 = _int8_rows(w)
    err_gptq = float((x @ (w - q8.float() * s8[:, None]).t()).norm())
    err_rtn = float((x @ (w - r8.float() * rs8[:, None]).t()).norm())
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_quantize_linear_with_hessian_and_smoothing_checks():
    lin = torch.nn.Linear(64, 32)
    x = _correlated_inputs(k=64)
    h = x.t() @ x / x.shape[0]
    plain = quantize_linear(lin, "int4_weight_only", group_size=32)
    fed = quantize_linear(lin, "int4_weight_only", group_size=32, hessian=h)
    with torch.no_grad():
        ref = lin(x)
        assert float((fed(x) - ref).norm()) < float((plain(x) - ref).norm())
    with pytest.raises(DiffspeedError, match="GPTQ rounding supports|sm89"):  # fp8: refused either way
        quantize_linear(lin, "fp8_w8a8", hessian=h)
    with pytest.raises(DiffspeedError, match="finite"):
        quantize_linear(lin, "int4_weight_only", group_size=32, hessian=torch.eye(63))


def test_collect_hessians_is_the_input_second_moment():
    lin = torch.nn.Sequential(torch.nn.Linear(8, 8))
    xs = [torch.randn(5, 8), torch.randn(3, 8)]
    hs = collect_hessians(lin, lambda: [lin(x) for x in xs], ["0"])
    x = torch.cat(xs)
    assert torch.allclose(hs["0"], x.t() @ x / 8, atol=1e-5)
    with pytest.raises(DiffspeedError, match="never called"):
        collect_hessians(lin, lambda: None, ["0"])
    with pytest.raises(DiffspeedError, match="not an nn.Linear"):
        collect_hessians(lin, lambda: None, ["nope"])


def test_config_validation_and_apply_without_calibration():
    with pytest.raises(DiffspeedError, match="fp8"):
        PTQConfig(format="fp8_w8a8", gptq=True)
    with pytest.raises(DiffspeedError, match="gptq_damp"):
        PTQConfig(format="int4_weight_only", gptq=True, gptq_damp=0.0)
    loaded = load_tiny("reference-image")
    with pytest.raises(DiffspeedError, match="ptq_gptq_"):
        diffspeed.apply(loaded.transformer, PTQConfig(format="int4_weight_only", group_size=32, gptq=True))
    assert not any(isinstance(m, QuantLinear) for m in loaded.transformer.modules())
    with pytest.raises(DiffspeedError, match="gptq=True"):
        ptq_gptq_(loaded, PTQConfig(format="int4_weight_only"), seeds=[0], labels=[0], num_steps=4)


def _latents(loaded) -> torch.Tensor:
    cond = loaded.make_condition(LABELS, torch.device("cpu"))
    return sample(loaded.transformer, cond, seeds=SEEDS, latent_shape=loaded.latent_shape, num_steps=STEPS,
                  guidance_scale=3.0)


def test_ptq_gptq_improves_fidelity_on_the_reference_model_and_round_trips(tmp_path):
    full = _latents(load_tiny("reference-image"))
    rtn = load_tiny("reference-image")
    ptq_model_(rtn.transformer, PTQConfig(format="int4_weight_only", group_size=32))
    err_rtn = float((_latents(rtn) - full).norm())
    fed = load_tiny("reference-image")
    cfg = PTQConfig(format="int4_weight_only", group_size=32, gptq=True)
    report = ptq_gptq_(fed, cfg, seeds=[10, 11], labels=[0, 1], num_steps=STEPS, guidance_scale=3.0)
    out = _latents(fed)
    err_gptq = float((out - full).norm())
    assert report.quantized and err_gptq < 0.85 * err_rtn, (err_gptq, err_rtn)
    save_ptq(fed.transformer, tmp_path / "g")
    again = load_tiny("reference-image")
    load_ptq_(again.transformer, tmp_path / "g")
    assert torch.equal(_latents(again), out)
