"""ptq_: in-place post-training quantization onto low-bit kernels, with timestep-aware calibration."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import diffspeed
from diffspeed.errors import AlreadyAppliedError, DiffspeedError, WeightFileError
from diffspeed.methods.ptq import PTQConfig, load_ptq_, ptq_model_, save_ptq
from diffspeed.quant.calibration import ActivationStats, calibrate, collect_activation_stats
from diffspeed.quant.formats import QuantLinear
from diffspeed.recipe import Recipe
from diffspeed.sampler import sample
from method_tester import load_tiny

STEPS = 10
SEEDS, LABELS = [3, 4], [5, 6]
PSNR_FLOOR_DB = 27.0  # measured 31.8 dB (static + smooth 0.5), 39 dB static, 42 dB dynamic


def _latents(loaded) -> torch.Tensor:
    cond = loaded.make_condition(LABELS, torch.device("cpu"))
    return sample(loaded.transformer, cond, seeds=SEEDS, latent_shape=loaded.latent_shape, num_steps=STEPS,
                  guidance_scale=3.0)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return 10 * math.log10(float(b.max() - b.min()) ** 2 / mse) if mse > 0 else math.inf


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    loaded = load_tiny("reference-image")
    stats = calibrate(loaded, seeds=[0, 1], labels=[0, 1], steps=6, num_groups=4, progress=False)
    path = tmp_path_factory.mktemp("ptq") / "stats.safetensors"
    stats.save(path)
    return stats, str(path)


@pytest.fixture(scope="module")
def baseline():
    return _latents(load_tiny("reference-image"))


def test_calibration_stats_per_timestep_group(calib):
    stats, path = calib
    assert stats.num_groups == 4 and stats.model_class == "DiTTransformer2DModel"
    layer = "transformer_blocks.3.ff.net.2"
    st = stats.layers[layer]
    assert st["chan_absmax"].shape == (4, 768) and (st["calls"] > 0).all()
    assert len(set(st["absmax"].tolist())) == 4, "groups must see different activation ranges"
    assert (st["pctl"] <= st["absmax"]).all() and (st["pctl"] > 0).all()
    again = ActivationStats.load(path)
    assert again.in_features == stats.in_features
    for k, v in st.items():
        assert torch.equal(again.layers[layer][k], v)
    loaded = load_tiny("reference-image")
    loaded2 = load_tiny("tiny-dit")
    with pytest.raises(DiffspeedError, match="not a DiTTransformer2DModel|input channels|does not have"):
        again.check_model(loaded2.transformer)
    again.check_model(loaded.transformer)


def test_collect_removes_hooks_on_error():
    loaded = load_tiny("reference-image")
    m = loaded.transformer
    lin = m.get_submodule("transformer_blocks.0.attn1.to_q")

    def boom():
        raise RuntimeError("generation failed")

    with pytest.raises(RuntimeError):
        collect_activation_stats(m, boom, ["transformer_blocks.0.attn1.to_q"])
    assert not lin._forward_pre_hooks
    with pytest.raises(DiffspeedError, match="sampler"):  # no step index: a bare forward call
        collect_activation_stats(m, lambda: lin(torch.randn(2, 192)), ["transformer_blocks.0.attn1.to_q"])
    assert not lin._forward_pre_hooks
    with pytest.raises(DiffspeedError, match="not an nn.Linear"):
        collect_activation_stats(m, lambda: None, ["transformer_blocks.0"])


def test_ptq_static_smooth_on_reference(calib, baseline, tmp_path):
    _, path = calib
    loaded = load_tiny("reference-image")
    cfg = PTQConfig(format="int8_w8a8", act="static", calibration=path, smooth_alpha=0.5)
    handle = diffspeed.apply(loaded.transformer, cfg)
    st = handle.stats
    assert st["layers_quantized"] > 0 and st["weight_mb_after"] < st["weight_mb_before"]
    assert st["kernels"] == "torch._int_mm"
    qls = [m for m in loaded.transformer.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == st["layers_quantized"]
    assert all(q.smooth is not None and q.act_scale.shape == (5,) for q in qls)  # 4 groups + their max
    out = _latents(loaded)
    assert not torch.equal(out, baseline), "ptq_ must change the output"
    psnr = _psnr(out, baseline)
    assert psnr >= PSNR_FLOOR_DB, f"PSNR {psnr:.2f} dB"
    with pytest.raises(DiffspeedError, match="reload"):
        handle.remove()
    with pytest.raises(AlreadyAppliedError):
        diffspeed.apply(loaded.transformer, cfg)

    # save / load round trip: bit-identical
    save_ptq(loaded.transformer, tmp_path / "q")
    fresh = load_tiny("reference-image")
    report = load_ptq_(fresh.transformer, tmp_path / "q")
    assert report.quantized == handle.report.quantized
    assert torch.equal(_latents(fresh), out)

    # corrupt / mismatched checkpoints
    with pytest.raises(WeightFileError, match="saved from a"):
        load_ptq_(load_tiny("tiny-wan").transformer, tmp_path / "q")
    weights = tmp_path / "q" / "ptq.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(WeightFileError, match="corrupt or truncated"):
        load_ptq_(load_tiny("reference-image").transformer, tmp_path / "q")
    (tmp_path / "q" / "ptq_config.json").write_text("{not json")
    with pytest.raises(WeightFileError, match="valid JSON"):
        load_ptq_(load_tiny("reference-image").transformer, tmp_path / "q")
    with pytest.raises(WeightFileError, match="not a ptq_ checkpoint"):
        load_ptq_(load_tiny("reference-image").transformer, tmp_path / "nothing")


def test_ptq_dynamic_python_entry(baseline):
    loaded = load_tiny("reference-image")
    report = ptq_model_(loaded.transformer, PTQConfig(format="int8_w8a8"),
                        filter_fn=lambda m, fqn: ".ff." in fqn)
    assert report.quantized and all(".ff." in f for f in report.quantized)
    assert report.quantized_bytes_after < 0.3 * report.quantized_bytes_before
    out = _latents(loaded)
    assert not torch.equal(out, baseline) and _psnr(out, baseline) > 35.0


def test_ptq_config_errors(calib):
    _, path = calib
    with pytest.raises(DiffspeedError, match="calibration"):
        PTQConfig(act="static")
    with pytest.raises(DiffspeedError, match="calibration"):
        PTQConfig(smooth_alpha=0.5)
    with pytest.raises(DiffspeedError, match=r"\[0, 1\]"):
        PTQConfig(smooth_alpha=2.0, calibration=path)
    with pytest.raises(DiffspeedError, match="format must be one of"):
        PTQConfig(format="int3")
    with pytest.raises(DiffspeedError, match="w8a8"):
        PTQConfig(format="int4_weight_only", act="static", calibration=path)
    with pytest.raises(DiffspeedError, match="group_size"):
        PTQConfig(format="int4_weight_only", group_size=100)
    with pytest.raises(DiffspeedError, match="regex"):
        PTQConfig(exclude=("(",))
    loaded = load_tiny("reference-image")
    with pytest.raises(DiffspeedError, match="selected no layer"):
        diffspeed.apply(loaded.transformer, PTQConfig(exclude=(".*",)))
    with pytest.raises(DiffspeedError, match="selected no layer.*not divisible by the int4 group size"):
        # the attention linears have 192 in-features: not a multiple of 128
        diffspeed.apply(loaded.transformer, PTQConfig(format="int4_weight_only", group_size=128, exclude=("ff",)))
    with pytest.raises(DiffspeedError, match="sm89"):
        diffspeed.apply(loaded.transformer, PTQConfig(format="fp8_w8a8"))
    with pytest.raises(WeightFileError, match="no calibration stats file"):
        diffspeed.apply(loaded.transformer, PTQConfig(act="static", calibration="/nonexistent/stats.safetensors"))
    tiny = load_tiny("tiny-dit")
    with pytest.raises(DiffspeedError, match="recalibrate"):
        diffspeed.apply(tiny.transformer, PTQConfig(act="static", calibration=path))
    assert not any(isinstance(m, QuantLinear) for m in loaded.transformer.modules())


def test_ptq_json_round_trip(calib):
    cfg = PTQConfig(format="int8_w8a8", act="static", calibration=calib[1], smooth_alpha=0.5, exclude=("ff",))
    again = Recipe.from_json(Recipe((cfg,)).to_json())
    assert again.methods == (cfg,)
    assert json.loads(json.dumps(cfg.to_dict()))["method"] == "ptq_"


def test_ptq_int4_dequant_layout_round_trip(tmp_path):
    """int4 with int4_kernel='dequant' (what 'auto' picks on CUDA): quantized, 4-bit storage, and a
    save/load round trip that rebuilds the same layout bit-identically."""
    loaded = load_tiny("reference-image")
    baseline = _latents(loaded)
    cfg = PTQConfig(format="int4_weight_only", group_size=32, int4_kernel="dequant")
    handle = diffspeed.apply(loaded.transformer, cfg)
    qls = [m for m in loaded.transformer.modules() if isinstance(m, QuantLinear)]
    assert qls and all(q.int4_layout == "dequant" and q.qweight.dtype == torch.uint8 for q in qls)
    out = _latents(loaded)
    assert not torch.equal(out, baseline)
    assert handle.report.quantized_bytes_after * 3.5 <= handle.report.quantized_bytes_before
    save_ptq(loaded.transformer, tmp_path / "q4")
    fresh = load_tiny("reference-image")
    load_ptq_(fresh.transformer, tmp_path / "q4")
    assert all(m.int4_layout == "dequant" for m in fresh.transformer.modules() if isinstance(m, QuantLinear))
    assert torch.equal(_latents(fresh), out)
    with pytest.raises(DiffspeedError, match="int4_kernel"):
        PTQConfig(format="int4_weight_only", int4_kernel="fastest")


def test_dynamic_ptq_adds_no_step_hook_and_compiles_in_one_graph():
    """Dynamic scales need no StepContext: its auto-mode pre-hook reads the timestep on the host, which
    under torch.compile is a graph break and a sync per call (measured on the H100: +1 ms per DiT call)."""
    loaded = load_tiny("reference-image")
    model = loaded.transformer
    ptq_model_(model, PTQConfig(format="int8_w8a8"))
    assert not model._forward_pre_hooks and "_diffspeed_context_hook" not in model.__dict__
    assert all(q._ctx is None for q in model.modules() if isinstance(q, QuantLinear))
    kwargs = dict(loaded.make_condition([1], torch.device("cpu")).cond)
    x = torch.randn(1, *loaded.latent_shape)
    t = torch.full((1,), 500.0)
    with torch.no_grad():
        eager = model(hidden_states=x, timestep=t, **kwargs, return_dict=False)[0]
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
        out = compiled(hidden_states=x, timestep=t, **kwargs, return_dict=False)[0]
    torch.testing.assert_close(out, eager)


def test_static_ptq_keeps_its_step_hook(calib):
    stats, path = calib
    model = load_tiny("reference-image").transformer
    ptq_model_(model, PTQConfig(format="int8_w8a8", act="static", calibration=path))
    assert "_diffspeed_context_hook" in model.__dict__
