import torch

import diffspeed
from diffspeed.methods import CompileConfig
from diffspeed.sampler import generate

from method_tester import MethodTests


class TestCompileMethod(MethodTests):
    expect_change = False  # compiling must not change the function...
    changed_stat = "compiled_calls"  # ...but every call must go through the compiled path
    steps = 3

    def make_config(self):
        return CompileConfig(backend="eager")


def test_compiled_matches_eager(tiny_dit):
    base = generate(tiny_dit, [0], [0], num_steps=2)
    with diffspeed.apply(tiny_dit.transformer, CompileConfig(backend="aot_eager")) as h:
        out = generate(tiny_dit, [0], [0], num_steps=2)
        assert h.stats["compiled_calls"] == 2
    torch.testing.assert_close(out, base, atol=1e-5, rtol=1e-5)


class TestRegionalCompileMethod(MethodTests):
    expect_change = False
    changed_stat = "compiled_calls"
    steps = 3

    def make_config(self):
        return CompileConfig(backend="eager", scope="blocks")


def test_regional_compile_runs_under_a_cache(tiny_dit):
    """Blocks compiled under the cache's wrappers: same output as the cache alone, skipped blocks not compiled-called."""
    from diffspeed.methods import StepCacheConfig
    from diffspeed.recipe import Recipe, apply_recipe

    cache = StepCacheConfig(threshold=1e9, warmup_steps=2, final_steps=1)
    with diffspeed.apply(tiny_dit.transformer, cache) as h:
        ref = generate(tiny_dit, [0], [0], num_steps=8)
        skipped = h.stats["skipped_steps"]
    with apply_recipe(tiny_dit.transformer, Recipe((cache, CompileConfig(backend="aot_eager", scope="blocks")))) as rh:
        out = generate(tiny_dit, [0], [0], num_steps=8)
        stats = rh.stats
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    n_blocks = len(tiny_dit.adapter.blocks(tiny_dit.transformer))
    assert stats["step_cache"]["skipped_steps"] == skipped > 0
    # block 0 is only called (and compiled) on computed steps; the other blocks pass through their wrapper
    assert stats["compile"]["compiled_calls"] == (8 - skipped) * n_blocks


def test_bad_scope():
    import pytest

    from diffspeed.errors import DiffspeedError

    with pytest.raises(DiffspeedError, match="scope"):
        CompileConfig(scope="everything")


def test_tune_kernels_passes_coordinate_descent_options(tiny_dit, monkeypatch):
    """tune_kernels spells the mode out as options (torch.compile takes one or the other) plus tuning."""
    import diffspeed.methods.compile as compile_mod

    seen = {}
    real = torch.compile

    def spy(fn, **kw):
        seen.update(kw)
        return real(fn, backend="eager")

    monkeypatch.setattr(compile_mod.torch, "compile", spy)
    with diffspeed.apply(tiny_dit.transformer, CompileConfig(mode="max-autotune-no-cudagraphs", tune_kernels=True)):
        pass
    assert "mode" not in seen
    assert seen["options"]["coordinate_descent_tuning"] is True and seen["options"]["max_autotune"] is True
    seen.clear()
    with diffspeed.apply(tiny_dit.transformer, CompileConfig()):
        pass
    assert seen["mode"] == "default" and "options" not in seen


def test_tune_kernels_must_be_bool():
    import pytest

    from diffspeed.errors import DiffspeedError

    with pytest.raises(DiffspeedError, match="tune_kernels"):
        CompileConfig(tune_kernels="yes")
