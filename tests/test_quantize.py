"""quantize_: torchao low-bit linear weights, in place (own tests: the shared suite assumes reversible methods)."""

from __future__ import annotations

import json

import pytest
import torch

import diffspeed
import diffspeed.methods.quantize as qz
from diffspeed.errors import AlreadyAppliedError, DiffspeedError
from diffspeed.methods.quantize import (
    QuantizeConfig,
    backend_unavailable_reasons,
    load_quantized_,
    quantize_model_,
    save_quantized,
)
from diffspeed.models.loading import load_model
from diffspeed.recipe import Recipe
from diffspeed.sampler import generate

pytest.importorskip("torchao")

SEEDS = (0, 1)


def _load(name: str):
    torch.manual_seed(0)
    return load_model(name)


def _run(loaded, steps: int = 4) -> torch.Tensor:
    labels = [i % (loaded.num_classes or 4) for i in range(len(SEEDS))]
    return generate(loaded, labels, list(SEEDS), num_steps=steps, guidance_scale=3.0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", ["tiny-dit", "tiny-wan"])
def test_int8_weight_only_rounds_but_stays_close(name):
    loaded = _load(name)
    base = _run(loaded)
    handle = diffspeed.apply(loaded.transformer, QuantizeConfig(backend="int8_weight_only"))
    out = _run(loaded)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, base), "int8 weights must really round"
    assert _rel(out, base) < 0.05
    st = handle.stats
    assert st["layers_quantized"] > 0 and st["layers_skipped"] > 0
    assert st["weight_mb_after"] < st["weight_mb_before"]
    report = handle.report
    assert report.quantized_bytes_after < 0.35 * report.quantized_bytes_before  # int8 + per-row scales
    for fqn in report.quantized:
        assert qz._is_quantized(loaded.transformer.get_submodule(fqn).weight)


def test_sensitive_layers_skipped_by_default():
    dit = _load("tiny-dit").transformer
    report = quantize_model_(dit, QuantizeConfig())
    skipped = report.skipped
    assert skipped["proj_out_1"].startswith("sensitive: final")
    assert skipped["proj_out_2"].startswith("sensitive: final")
    assert skipped["transformer_blocks.0.norm1.linear"].startswith("sensitive: adaLN")
    assert skipped["transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"].startswith("sensitive: embedding")
    assert "transformer_blocks.0.attn1.to_q" in report.quantized
    assert "transformer_blocks.0.ff.net.2" in report.quantized
    assert not any("norm" in f or "emb" in f or f.startswith("proj_out") for f in report.quantized)

    wan = _load("tiny-wan").transformer
    report = quantize_model_(wan, QuantizeConfig())
    assert report.skipped["proj_out"].startswith("sensitive: final")
    assert report.skipped["condition_embedder.time_proj"].startswith("sensitive")
    assert report.skipped["condition_embedder.text_embedder.linear_1"].startswith("sensitive: embedding")
    assert all(f.startswith("blocks.") for f in report.quantized)


def test_flux_inner_proj_out_is_quantized_final_is_not():
    flux = _load("tiny-flux").transformer
    chosen, skipped = qz.select_layers(flux, QuantizeConfig())
    assert "single_transformer_blocks.0.proj_out" in chosen
    assert skipped["proj_out"].startswith("sensitive: final")
    assert skipped["x_embedder"].startswith("sensitive: embedding")
    assert skipped["single_transformer_blocks.0.norm.linear"].startswith("sensitive: adaLN")


def test_include_exclude_and_filter_fn():
    dit = _load("tiny-dit").transformer
    cfg = QuantizeConfig(include=(r"^proj_out_2$",), exclude=(r"\.ff\.",))
    chosen, skipped = qz.select_layers(dit, cfg)
    assert "proj_out_2" in chosen and "proj_out_1" not in chosen
    assert not any(".ff." in f for f in chosen)
    assert skipped["transformer_blocks.0.ff.net.2"] == "excluded by pattern"
    # exclude wins over include
    chosen, _ = qz.select_layers(dit, QuantizeConfig(include=("proj_out",), exclude=("proj_out_1",)))
    assert "proj_out_2" in chosen and "proj_out_1" not in chosen

    report = quantize_model_(dit, QuantizeConfig(), filter_fn=lambda m, fqn: fqn.endswith("to_q"))
    assert report.quantized and all(f.endswith("to_q") for f in report.quantized)
    assert report.skipped["transformer_blocks.0.attn1.to_k"] == "filter_fn returned False"
    assert not qz._is_quantized(dit.get_submodule("transformer_blocks.0.attn1.to_k").weight)


def test_apply_twice_raises_and_remove_names_reload():
    loaded = _load("tiny-dit")
    handle = diffspeed.apply(loaded.transformer, QuantizeConfig())
    with pytest.raises(AlreadyAppliedError):
        diffspeed.apply(loaded.transformer, QuantizeConfig())
    with pytest.raises(AlreadyAppliedError):
        quantize_model_(loaded.transformer, QuantizeConfig())
    with pytest.raises(DiffspeedError, match="reload"):
        handle.remove()
    # a model quantized outside the registry (no handle) is caught by its layers
    other = _load("tiny-dit").transformer
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(other, Int8WeightOnlyConfig())
    with pytest.raises(AlreadyAppliedError, match="already quantized"):
        diffspeed.apply(other, QuantizeConfig())


def test_int8_dynamic_runs_on_cpu():
    if backend_unavailable_reasons("int8_dynamic", "cpu"):
        pytest.skip(f"int8_dynamic unavailable: {backend_unavailable_reasons('int8_dynamic', 'cpu')}")
    loaded = _load("tiny-dit")
    base = _run(loaded, steps=2)
    handle = diffspeed.apply(loaded.transformer, QuantizeConfig(backend="int8_dynamic"))
    out = _run(loaded, steps=2)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    assert _rel(out, base) < 0.1
    assert handle.stats["layers_quantized"] > 0


def test_fp8_on_cpu_lists_reasons():
    reasons = backend_unavailable_reasons("fp8_dynamic_row", "cpu")
    assert any("8.9" in r for r in reasons)
    dit = _load("tiny-dit").transformer
    with pytest.raises(DiffspeedError, match="fp8_dynamic_row.*unavailable.*sm89"):
        diffspeed.apply(dit, QuantizeConfig(backend="fp8_dynamic_row"))
    assert not any(qz._is_quantized(p) for p in dit.parameters())  # nothing half-done


def test_int4_lists_reasons():
    reasons = backend_unavailable_reasons("int4_weight_only", "cpu")
    if not reasons:
        pytest.skip("int4 weight-only is available here")
    assert any("CUDA" in r for r in reasons)
    dit = _load("tiny-dit").transformer
    with pytest.raises(DiffspeedError, match="int4_weight_only.*unavailable") as exc:
        diffspeed.apply(dit, QuantizeConfig(backend="int4_weight_only"))
    for r in reasons:
        assert r in str(exc.value)


def test_unknown_backend_and_bad_regex():
    with pytest.raises(DiffspeedError, match="backend must be one of"):
        QuantizeConfig(backend="int3")
    with pytest.raises(DiffspeedError, match="not a valid regex"):
        QuantizeConfig(exclude=("(",))
    assert backend_unavailable_reasons("nope")


def test_save_load_round_trip_bit_identical(tmp_path):
    loaded = _load("tiny-dit")
    quantize_model_(loaded.transformer, QuantizeConfig(include=(r"^proj_out_2$",)))
    saved_out = _run(loaded)
    path = save_quantized(loaded.transformer, tmp_path / "q")
    meta = json.loads((path / qz.CONFIG_FILE).read_text())
    assert meta["config"]["backend"] == "int8_weight_only"
    assert "proj_out_2" in meta["quantized"] and meta["torchao_version"]
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))  # no pickle

    fresh = _load("tiny-dit")
    with torch.no_grad():  # make sure the tensors really come from the file
        for p in fresh.transformer.parameters():
            p.add_(0.01)
    report = load_quantized_(fresh.transformer, path)
    assert report.quantized == meta["quantized"]
    assert torch.equal(_run(fresh), saved_out)
    with pytest.raises(AlreadyAppliedError):
        diffspeed.apply(fresh.transformer, QuantizeConfig())

    with pytest.raises(diffspeed.DiffspeedError, match="not a quantized checkpoint"):
        load_quantized_(_load("tiny-dit").transformer, tmp_path / "missing")
    with pytest.raises(diffspeed.DiffspeedError, match="not a"):
        load_quantized_(_load("tiny-wan").transformer, path)


def test_save_unquantized_refuses(tmp_path):
    with pytest.raises(DiffspeedError, match="not quantized"):
        save_quantized(_load("tiny-dit").transformer, tmp_path / "q")


def test_recipe_json_round_trip():
    recipe = Recipe.from_json('{"methods": [{"method": "quantize_", "backend": "int8_weight_only"}]}')
    assert recipe.methods == (QuantizeConfig(backend="int8_weight_only"),)
    cfg = QuantizeConfig(backend="int8_dynamic", include=("a",), exclude=("b", "c"), skip_sensitive=False)
    assert Recipe.from_json(Recipe((cfg,)).to_json()).methods == (cfg,)
    assert "quantize_" in diffspeed.method_names()


def test_all_layers_matches_diffusers_torchaoconfig():
    """The peer baseline: ``quantize_`` with ``skip_sensitive=False`` quantizes exactly the layers that
    diffusers' ``from_pretrained(..., quantization_config=TorchAoConfig(...))`` does, with the same result."""
    pytest.importorskip("torchao")
    from diffusers import DiTTransformer2DModel, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    from diffspeed.models.reference import WEIGHTS_DIR

    folder = WEIGHTS_DIR / "reference-image"
    if not folder.exists():
        pytest.skip("reference weights missing")
    theirs = DiTTransformer2DModel.from_pretrained(folder, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()),
                                                   torch_dtype=torch.float32)
    ours = load_model("reference-image").transformer
    report = quantize_model_(ours, QuantizeConfig(backend="int8_weight_only", skip_sensitive=False))

    def quantized(m):
        return {n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and qz._is_quantized(mod.weight)}

    assert quantized(theirs) == quantized(ours) == set(report.quantized) and len(report.quantized) > 50
    size, channels = ours.config.sample_size, ours.config.in_channels
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    kw = dict(timestep=torch.tensor([500.0, 20.0]), class_labels=torch.tensor([0, 3]), return_dict=False)
    with torch.no_grad():
        assert torch.equal(theirs(x, **kw)[0], ours(x, **kw)[0])


def test_torchao_leaves_the_inductor_config_alone():
    """torchao's configs switch Inductor's coordinate-descent tuning on process-wide when applied; the
    wrapper restores it, so models compiled later in the process (a benchmark's bf16 row) are unaffected."""
    import torch._inductor.config as inductor_config

    before = inductor_config.coordinate_descent_tuning
    loaded = _load("tiny-dit")
    diffspeed.apply(loaded.transformer, QuantizeConfig(backend="int8_weight_only"))
    assert inductor_config.coordinate_descent_tuning == before
