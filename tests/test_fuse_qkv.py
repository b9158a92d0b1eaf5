import contextlib
from collections import Counter

import pytest
import torch

import diffspeed
from diffspeed.errors import DiffspeedError
from diffspeed.methods import CompileConfig, FuseQKVConfig
from diffspeed.methods.base import Stage, applied_methods, config_from_dict
from diffspeed.recipe import Recipe, apply_recipe
from diffspeed.sampler import generate

from method_tester import MethodTests, RoundLinear, load_tiny

ZOO = ["tiny-dit", "tiny-pixart", "tiny-sd3", "tiny-flux", "tiny-wan", "tiny-cogvideox"]
PROJ = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj",
        "to_qkv", "to_kv", "to_added_qkv", "to_added_kv")


class TestFuseQKVDiT(MethodTests):
    expect_change = False  # exact up to float rounding
    changed_stat = "fused_modules"
    steps = 4

    def make_config(self):
        return FuseQKVConfig()


class TestFuseQKVWanCross(TestFuseQKVDiT):
    model_name = "tiny-wan"

    def make_config(self):
        return FuseQKVConfig(include_cross_attention=True)


def _attention(loaded):
    from diffspeed.adapters.base import get_adapter

    return get_adapter(loaded.transformer).attention_modules(loaded.transformer)


@contextlib.contextmanager
def count_projection_calls(loaded):
    """Counter of (attention fqn, projection name) -> calls, over the attention modules' projections."""
    counts: Counter = Counter()
    hooks = []
    for fqn, attn in _attention(loaded):
        for name in PROJ:
            layer = getattr(attn, name, None)
            if isinstance(layer, torch.nn.Module):
                hooks.append(layer.register_forward_hook(
                    lambda *_, key=(fqn, name): counts.update([key])))
    try:
        yield counts
    finally:
        for h in hooks:
            h.remove()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("model_name", ZOO)
def test_exact_on_every_zoo_model_and_one_gemm(model_name):
    loaded = load_tiny(model_name)
    base = generate(loaded, [0, 1], [0, 1], num_steps=3)
    with diffspeed.apply(loaded.transformer, FuseQKVConfig()) as h:
        with count_projection_calls(loaded) as calls:
            out = generate(loaded, [0, 1], [0, 1], num_steps=3)
        fused = [(fqn, a) for fqn, a in _attention(loaded) if getattr(a, "to_qkv", None) is not None]
    assert h.stats["fused_modules"] == len(fused) > 0, h.stats
    assert _rel(out, base) <= 1e-5, f"{model_name}: fused output differs by {_rel(out, base):.3g} relative"
    # three q/k/v GEMMs per self-attention call became one
    for fqn, attn in fused:
        assert calls[(fqn, "to_qkv")] > 0, (fqn, calls)
        assert calls[(fqn, "to_q")] == calls[(fqn, "to_k")] == calls[(fqn, "to_v")] == 0, (fqn, calls)
        if getattr(attn, "add_q_proj", None) is not None:  # SD3 / Flux text projections too
            assert calls[(fqn, "add_q_proj")] == 0 and calls[(fqn, "to_added_qkv")] > 0, (fqn, calls)
    # removed: the original layers run again, the fused ones are gone, outputs bit-identical
    with count_projection_calls(loaded) as calls:
        after = generate(loaded, [0, 1], [0, 1], num_steps=3)
    assert torch.equal(after, base)
    for fqn, attn in fused:
        assert calls[(fqn, "to_q")] > 0 and calls[(fqn, "to_qkv")] == 0
        assert not any(hasattr(attn, n) for n in ("to_qkv", "to_kv", "to_added_qkv", "to_added_kv"))
        assert not attn.fused_projections


def test_remove_restores_processors_flags_and_state_dict():
    loaded = load_tiny("tiny-pixart")
    mods = [a for _, a in _attention(loaded)]
    procs = [a.processor for a in mods]
    keys = set(loaded.transformer.state_dict())
    h = diffspeed.apply(loaded.transformer, FuseQKVConfig(include_cross_attention=True))
    assert all(type(a.processor).__name__ == "FusedAttnProcessor2_0" for a in mods)
    assert any(k.endswith("to_qkv.weight") for k in loaded.transformer.state_dict())
    h.remove()
    assert all(a.processor is p for a, p in zip(mods, procs))
    assert all("fused_projections" not in vars(a) or not a.fused_projections for a in mods)
    assert set(loaded.transformer.state_dict()) == keys


def test_cross_attention_skipped_by_default_and_fused_on_request():
    loaded = load_tiny("tiny-pixart")
    base = generate(loaded, [0, 1], [0, 1], num_steps=3)
    n_blocks = len(loaded.transformer.transformer_blocks)
    with diffspeed.apply(loaded.transformer, FuseQKVConfig()) as h:
        assert h.stats["fused_self_attention"] == n_blocks and h.stats["fused_cross_attention"] == 0
        assert h.stats["skipped_modules"] == n_blocks
        assert all("cross-attention" in r for r in h.stats["skipped_reasons"].values())
        assert all(n.endswith("attn2") for n in h.stats["skipped_reasons"])
        assert not hasattr(loaded.transformer.transformer_blocks[0].attn2, "to_kv")
    with diffspeed.apply(loaded.transformer, FuseQKVConfig(include_cross_attention=True)) as h:
        with count_projection_calls(loaded) as calls:
            out = generate(loaded, [0, 1], [0, 1], num_steps=3)
        assert h.stats["fused_cross_attention"] == n_blocks and h.stats["skipped_modules"] == 0
    key = ("transformer_blocks.0.attn2", "to_kv")
    assert calls[key] > 0 and calls[("transformer_blocks.0.attn2", "to_k")] == 0
    assert calls[("transformer_blocks.0.attn2", "to_q")] > 0  # q still from the latents alone
    assert _rel(out, base) <= 1e-5
    assert torch.equal(generate(loaded, [0, 1], [0, 1], num_steps=3), base)


def test_nothing_to_fuse_raises_and_leaves_model_alone():
    from diffusers.models.attention_processor import AttnProcessor

    loaded = load_tiny("tiny-dit")
    for _, attn in _attention(loaded):
        attn.set_processor(AttnProcessor())  # the non-SDPA processor: no fused counterpart
    with pytest.raises(DiffspeedError, match=r"DiTTransformer2DModel.*AttnProcessor.*no fused counterpart"):
        diffspeed.apply(loaded.transformer, FuseQKVConfig())
    assert not applied_methods(loaded.transformer)
    assert all(getattr(a, "to_qkv", None) is None for _, a in _attention(loaded))


def test_quantized_projection_skipped_with_reason():
    loaded = load_tiny("tiny-dit")
    base = generate(loaded, [0], [0], num_steps=2)
    (fqn0, a0), (fqn1, a1) = _attention(loaded)[:2]
    a0.to_q = RoundLinear(a0.to_q, 8)  # as if a weight method had run first
    ref = generate(loaded, [0], [0], num_steps=2)
    assert not torch.equal(ref, base)
    with diffspeed.apply(loaded.transformer, FuseQKVConfig()) as h:
        out = generate(loaded, [0], [0], num_steps=2)
    assert h.stats["fused_modules"] == 1 and h.stats["skipped_modules"] == 1
    assert "RoundLinear" in h.stats["skipped_reasons"][fqn0] and fqn1 not in h.stats["skipped_reasons"]
    assert any(fqn0 in note for note in h.notes)
    assert _rel(out, ref) <= 1e-5


def test_already_fused_outside_is_skipped():
    loaded = load_tiny("tiny-dit")
    attn = _attention(loaded)[0][1]
    attn.fuse_projections()
    with diffspeed.apply(loaded.transformer, FuseQKVConfig()) as h:
        assert h.stats["fused_modules"] == len(_attention(loaded)) - 1
        assert "already fused" in next(iter(h.stats["skipped_reasons"].values()))
    assert getattr(attn, "to_qkv", None) is not None  # the user's fusion is left as it was


def test_config_json_and_validation():
    for cfg in (FuseQKVConfig(), FuseQKVConfig(include_cross_attention=True)):
        assert Recipe.from_json(Recipe((cfg,)).to_json()).methods == (cfg,)
        assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(DiffspeedError, match="include_cross_attention"):
        FuseQKVConfig(include_cross_attention="yes")
    with pytest.raises(DiffspeedError, match="no option"):
        config_from_dict({"method": "fuse_qkv", "chunk": 3})
    assert "fuse_qkv" in diffspeed.methods.method_names()


def test_runs_before_compile_in_a_recipe():
    assert FuseQKVConfig.stage < CompileConfig.stage and FuseQKVConfig.stage == Stage.STRUCTURE
    recipe = Recipe((CompileConfig(backend="eager"), FuseQKVConfig()))
    assert [c.method for c in recipe.ordered()] == ["fuse_qkv", "compile"]
    loaded = load_tiny("tiny-dit")
    base = generate(loaded, [0], [0], num_steps=2)
    with apply_recipe(loaded.transformer, recipe):
        out = generate(loaded, [0], [0], num_steps=2)
    assert _rel(out, base) <= 1e-5
    assert torch.equal(generate(loaded, [0], [0], num_steps=2), base)
