import math

import pytest
import torch

import diffspeed
from diffspeed.errors import DiffspeedError, IncompatibleMethodsError
from diffspeed.methods import BlockCacheConfig, StepCacheConfig
from diffspeed.methods import block_cache as bc
from diffspeed.recipe import Recipe
from diffspeed.sampler import generate

from method_tester import MethodTests, count_host_syncs


def _reusing(**kw):
    base = dict(threshold=50.0, max_consecutive=2, warmup_steps=2, final_steps=1)
    base.update(kw)
    return BlockCacheConfig(**base)


class TestBlockCacheDiT(MethodTests):
    changed_stat = "skipped_blocks"
    steps = 10

    def make_config(self):
        return _reusing()


class TestBlockCacheFlux(TestBlockCacheDiT):
    model_name = "tiny-flux"

    def make_config(self):
        return _reusing(front_blocks=1, back_blocks=1)  # 4 blocks: 2 reusable in the middle


class TestBlockCacheWan(TestBlockCacheDiT):
    model_name = "tiny-wan"
    steps = 6


class TestBlockCacheTaylor1(TestBlockCacheDiT):
    changed_stat = "forecast_steps"

    def make_config(self):
        return _reusing(taylor_order=1)


class TestBlockCacheTaylor2Flux(TestBlockCacheDiT):
    model_name = "tiny-flux"
    changed_stat = "forecast_steps"

    def make_config(self):
        return _reusing(taylor_order=2, front_blocks=2, decision="lagged")


@pytest.mark.parametrize("model_name", ["tiny-pixart", "tiny-sd3", "tiny-cogvideox"])
def test_runs_and_reuses_on_every_adapter(model_name):
    from diffspeed.models.loading import load_model

    loaded = load_model(model_name)
    base = generate(loaded, [0], [0], num_steps=6, guidance_scale=2.0)
    for order in (0, 2):
        cfg = BlockCacheConfig(threshold=50.0, warmup_steps=1, final_steps=0, taylor_order=order)
        with diffspeed.apply(loaded.transformer, cfg) as h:
            out = generate(loaded, [0], [0], num_steps=6, guidance_scale=2.0)
        assert torch.isfinite(out).all() and h.stats["reused_steps"] > 0 and h.stats["skipped_blocks"] > 0
        assert not torch.equal(out, base)
    assert torch.equal(generate(loaded, [0], [0], num_steps=6, guidance_scale=2.0), base)


@pytest.mark.parametrize("model_name", ["tiny-dit", "tiny-flux"])
def test_tiny_threshold_never_reuses_and_is_exact(model_name):
    from diffspeed.models.loading import load_model

    loaded = load_model(model_name)
    base = generate(loaded, [0, 1], [0, 1], num_steps=6, guidance_scale=2.0)
    for order in (0, 2):
        with diffspeed.apply(loaded.transformer, BlockCacheConfig(threshold=1e-9, taylor_order=order)) as h:
            out = generate(loaded, [0, 1], [0, 1], num_steps=6, guidance_scale=2.0)
        assert h.stats["reused_steps"] == 0 and h.stats["skipped_blocks"] == 0 and h.stats["computed_steps"] == 6
        assert torch.equal(out, base)


@pytest.mark.parametrize("decision", ["auto", "lagged"])
def test_schedule_respects_warmup_final_and_cap(tiny_dit, decision):
    cfg = BlockCacheConfig(threshold=1e9, max_consecutive=2, warmup_steps=3, final_steps=2, decision=decision)
    with diffspeed.apply(tiny_dit.transformer, cfg) as h:
        generate(tiny_dit, [0], [0], num_steps=12)
    # steps 0-2 warm-up, then (reuse, reuse, compute) repeating, last 2 computed
    # computed: 0,1,2,5,8,10,11 -> 7; reused: 3,4,6,7,9 -> 5
    assert h.stats["reused_steps"] == 5 and h.stats["computed_steps"] == 7
    assert h.stats["skipped_blocks"] == 5  # tiny-dit: 2 blocks, Fn=1 -> 1 middle block
    if decision == "auto":  # on the CPU every value is ready at once: always the current one
        assert h.stats["decisions_current"] > 0 and h.stats["decisions_lagged"] == 0
    else:
        assert h.stats["decisions_lagged"] > 0 and h.stats["decisions_current"] == 0


def test_auto_falls_back_to_lagged_when_value_not_ready(tiny_dit, monkeypatch):
    """When the current indicator is not on the host yet, auto decides exactly as decision='lagged'."""
    kw = dict(threshold=0.3, max_consecutive=3, warmup_steps=1, final_steps=0)
    with diffspeed.apply(tiny_dit.transformer, BlockCacheConfig(decision="lagged", **kw)) as h:
        lagged = generate(tiny_dit, [0, 1], [0, 1], num_steps=10, guidance_scale=3.0)
    lagged_stats = dict(h.stats)
    monkeypatch.setattr(bc, "_is_ready", lambda scalar: False)
    with diffspeed.apply(tiny_dit.transformer, BlockCacheConfig(decision="auto", **kw)) as h:
        auto = generate(tiny_dit, [0, 1], [0, 1], num_steps=10, guidance_scale=3.0)
    assert torch.equal(auto, lagged)
    assert h.stats["decisions_current"] == 0 and h.stats["decisions_lagged"] == lagged_stats["decisions_lagged"] > 0
    assert h.stats["reused_steps"] == lagged_stats["reused_steps"]


def test_back_blocks_run_on_reused_steps():
    from diffspeed.models.loading import load_model

    loaded = load_model("tiny-flux")
    blocks = loaded.adapter.blocks(loaded.transformer)
    assert len(blocks) == 4
    calls = {"last": 0, "middle_inner": 0}
    cfg = BlockCacheConfig(threshold=50.0, front_blocks=1, back_blocks=1, warmup_steps=1, final_steps=0)
    with diffspeed.apply(loaded.transformer, cfg) as h:
        last = blocks[-1][1]
        middle = blocks[1][1]
        # a hook on a sub-module of a middle block fires only when its real forward runs
        sub = next(m for m in middle.modules() if m is not middle and not list(m.children()))
        h1 = last.register_forward_hook(lambda *a: calls.__setitem__("last", calls["last"] + 1))
        h2 = sub.register_forward_hook(lambda *a: calls.__setitem__("middle_inner", calls["middle_inner"] + 1))
        generate(loaded, [0], [0], num_steps=8, guidance_scale=2.0)  # batched CFG: one forward per step
        h1.remove()
        h2.remove()
    assert h.stats["reused_steps"] > 0
    assert calls["last"] == 8  # the Bn block runs on every step, reused ones included
    assert calls["middle_inner"] == h.stats["computed_steps"] < 8  # middle blocks only on computed steps
    assert h.stats["skipped_blocks"] == 2 * h.stats["reused_steps"]


def test_front_plus_back_must_leave_a_middle_block(tiny_dit):
    with pytest.raises(DiffspeedError, match=r"2 blocks.*front_blocks \+ back_blocks <= 1"):
        diffspeed.apply(tiny_dit.transformer, BlockCacheConfig(front_blocks=1, back_blocks=1))
    with pytest.raises(DiffspeedError, match="at least one middle block"):
        diffspeed.apply(tiny_dit.transformer, BlockCacheConfig(front_blocks=2))
    # nothing was left applied or wrapped
    assert "block_cache" not in diffspeed.methods.applied_methods(tiny_dit.transformer)
    diffspeed.apply(tiny_dit.transformer, BlockCacheConfig()).remove()


def test_fidelity_guard_refuses_reuse(tiny_dit):
    with diffspeed.apply(tiny_dit.transformer, BlockCacheConfig(threshold=1e9, max_error=1e-9)) as h:
        generate(tiny_dit, [0], [0], num_steps=8)
    assert h.stats["reused_steps"] == 0 and h.stats["guard_refusals"] > 0


def test_separate_branches_have_separate_state(tiny_dit):
    with diffspeed.apply(tiny_dit.transformer, BlockCacheConfig(threshold=1e9)) as h:
        generate(tiny_dit, [0], [0], num_steps=6, guidance_scale=3.0, cfg_mode="separate")
        ctx = diffspeed.get_context(tiny_dit.transformer)
        states = ctx.branch_states(f"block_cache@{id(h)}")
        assert set(states) == {"cond", "uncond"}
        assert states["cond"]["mid"]["h"][0] is not states["uncond"]["mid"]["h"][0]
        assert h.stats["reused_steps"] > 0


def test_no_host_sync_in_hot_path(tiny_dit):
    """Decisions read host copies: no .item()/bool() on tensors during sampling."""
    for cfg in (BlockCacheConfig(threshold=0.3, taylor_order=2), BlockCacheConfig(threshold=0.3, decision="lagged")):
        with diffspeed.apply(tiny_dit.transformer, cfg) as h:
            generate(tiny_dit, [0], [0], num_steps=8, check_finite=False)  # warm-up of lazy imports
            with count_host_syncs() as syncs:
                generate(tiny_dit, [0], [0], num_steps=8, check_finite=False)
        assert h.stats["reused_steps"] > 0
        assert syncs.n == 0, cfg


def test_incompatible_with_step_cache(tiny_dit):
    with pytest.raises(IncompatibleMethodsError, match="step_cache"):
        Recipe((BlockCacheConfig(), StepCacheConfig()))
    with pytest.raises(IncompatibleMethodsError, match="block_cache"):
        Recipe((StepCacheConfig(), BlockCacheConfig()))
    with diffspeed.apply(tiny_dit.transformer, StepCacheConfig()):
        with pytest.raises(IncompatibleMethodsError):
            diffspeed.apply(tiny_dit.transformer, BlockCacheConfig())


def test_taylor_finite_differences():
    """TaylorSeer update/eval: order 1 is exact on a linear trajectory, and beats reuse on a smooth one."""
    a, b = torch.randn(5), torch.randn(5)
    lin = lambda k: a + b * k  # noqa: E731
    smooth = lambda k: a * math.cos(0.3 * k) + b * math.sin(0.2 * k)  # noqa: E731
    for traj, exact in ((lin, True), (smooth, False)):
        derivs = {0: None, 1: None, 2: None}
        errs = {}
        last = None
        for m in (0, 3, 6):  # computed steps, window 3
            for order in derivs:
                derivs[order] = bc._taylor_update(derivs[order], traj(m), m - last if last is not None else 0, order)
            last = m
        for order in derivs:
            forecast = bc._taylor_eval(derivs[order], 2)  # step 8
            errs[order] = (forecast - traj(8)).abs().mean().item()
        assert len(derivs[1]) == 2 and len(derivs[2]) == 3
        assert errs[1] < errs[0]
        if exact:
            assert errs[1] < 1e-5


def test_taylor_forecast_beats_reuse_on_smooth_middle_block(tiny_dit):
    """Middle block made to add a residual that is linear in the step index: order 1 forecasts it
    (output ~ full model), plain reuse lags behind (clearly wrong), at the same schedule."""
    model = tiny_dit.transformer
    ctx = diffspeed.get_context(model)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, generator=g) * 0.3, torch.randn(32, generator=g) * 0.1
    middle = tiny_dit.adapter.blocks(model)[1][1]
    middle.forward = lambda hidden_states, *args, **kwargs: hidden_states + a + b * ctx.step_index
    full = generate(tiny_dit, [0, 1], [0, 1], num_steps=12, guidance_scale=3.0)
    errs, schedules = {}, set()
    for order in (0, 1, 2):
        cfg = BlockCacheConfig(threshold=1e9, max_consecutive=3, warmup_steps=2, final_steps=1, taylor_order=order)
        with diffspeed.apply(model, cfg) as h:
            out = generate(tiny_dit, [0, 1], [0, 1], num_steps=12, guidance_scale=3.0)
        errs[order] = (out - full).abs().mean().item()
        schedules.add((h.stats["computed_steps"], h.stats["reused_steps"]))
    assert len(schedules) == 1 and next(iter(schedules))[1] > 0
    assert errs[0] > 1e-4
    assert errs[1] < 1e-3 * errs[0]  # linear residual: order-1 forecast is exact up to rounding
    assert errs[2] < 1e-3 * errs[0]  # second difference of a line is 0


def test_bad_config_values():
    with pytest.raises(DiffspeedError, match="threshold must be > 0"):
        BlockCacheConfig(threshold=0)
    with pytest.raises(DiffspeedError, match="front_blocks must be an integer >= 1"):
        BlockCacheConfig(front_blocks=0)
    with pytest.raises(DiffspeedError, match="back_blocks"):
        BlockCacheConfig(back_blocks=-1)
    with pytest.raises(DiffspeedError, match="warmup_steps"):
        BlockCacheConfig(warmup_steps=0)
    with pytest.raises(DiffspeedError, match="max_consecutive"):
        BlockCacheConfig(max_consecutive=0)
    with pytest.raises(DiffspeedError, match="taylor_order must be 0"):
        BlockCacheConfig(taylor_order=3)
    with pytest.raises(DiffspeedError, match="decision must be one of"):
        BlockCacheConfig(decision="current")
    with pytest.raises(DiffspeedError, match="max_error"):
        BlockCacheConfig(max_error=0)
    with pytest.raises(DiffspeedError, match="no option"):
        diffspeed.methods.config_from_dict({"method": "block_cache", "Fn": 2})
    cfg = diffspeed.methods.config_from_dict({"method": "block_cache", "front_blocks": 2, "taylor_order": 1})
    assert cfg == BlockCacheConfig(front_blocks=2, taylor_order=1)
