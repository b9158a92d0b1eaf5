import torch

import diffspeed
from diffspeed.context import StepContext, get_context
from diffspeed.sampler import generate


def test_explicit_steps_and_branches_keep_separate_state():
    ctx = StepContext()
    ctx.begin(4)
    ctx.set_step(0, 1000.0, "cond")
    ctx.state("m")["x"] = 1
    ctx.set_step(0, 1000.0, "uncond")
    assert "x" not in ctx.state("m")
    ctx.state("m")["x"] = 2
    ctx.set_step(1, 750.0, "cond")
    assert ctx.state("m")["x"] == 1
    assert ctx.progress == 0.25
    assert set(ctx.branch_states("m")) == {"cond", "uncond"}


def test_begin_resets_and_accepts_new_step_count():
    ctx = StepContext()
    ctx.begin(10)
    ctx.set_step(3, 500.0)
    ctx.state("m")["x"] = 1
    ctx.begin(3)
    assert ctx.num_steps == 3 and ctx.step_index == -1
    ctx.set_step(0, 1000.0)
    assert ctx.state("m") == {}


def test_auto_mode_infers_steps_branches_and_new_generation():
    ctx = StepContext()
    seq = []
    for t in [1000, 1000, 800, 800, 600, 600]:  # separate cond/uncond calls per step
        ctx.observe_call(torch.tensor([float(t)]))
        seq.append((ctx.step_index, ctx.branch))
    assert seq == [(0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond"), (2, "cond"), (2, "uncond")]
    gen = ctx.generation
    ctx.observe_call(torch.tensor([1000.0]))  # timestep goes up: a new request
    assert ctx.generation == gen + 1 and ctx.step_index == 0


def test_sampler_drives_context_explicitly(tiny_dit):
    seen = []
    model = tiny_dit.transformer
    ctx = get_context(model)

    def pre(mod, args, kwargs):
        seen.append((ctx.step_index, ctx.branch, ctx.num_steps))

    h = model.register_forward_pre_hook(pre, with_kwargs=True)
    generate(tiny_dit, [0, 1], [0, 1], num_steps=3, guidance_scale=2.0, cfg_mode="separate")
    h.remove()
    assert seen == [(0, "cond", 3), (0, "uncond", 3), (1, "cond", 3), (1, "uncond", 3), (2, "cond", 3), (2, "uncond", 3)]
    seen.clear()
    h = model.register_forward_pre_hook(pre, with_kwargs=True)
    generate(tiny_dit, [0], [0], num_steps=5, guidance_scale=2.0, cfg_mode="batched")
    h.remove()
    assert [s[0] for s in seen] == [0, 1, 2, 3, 4] and all(s[1] == "batched" and s[2] == 5 for s in seen)


def test_generation_context_manager_for_user_loops(tiny_dit):
    model = tiny_dit.transformer
    cond, _ = tiny_dit.adapter.dummy_condition(model, 1)
    with diffspeed.generation(model, num_steps=2) as ctx:
        for t in (1000.0, 500.0):
            tiny_dit.adapter.predict(model, torch.randn(1, *tiny_dit.latent_shape), torch.tensor([t]), cond)
        assert ctx.step_index == 1 and ctx.num_steps == 2
