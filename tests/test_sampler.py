import pytest
import torch

from diffspeed.errors import DiffspeedError, NonFiniteOutputError
from diffspeed.hooks import wrap_forward
from diffspeed.sampler import flow_sigmas, generate, sample


def test_flow_sigmas():
    s = flow_sigmas(4)
    assert torch.allclose(s, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    shifted = flow_sigmas(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and (shifted[1:-1] > s[1:-1]).all()


def test_seed_determines_sample_regardless_of_batch(tiny_dit):
    both = generate(tiny_dit, [1, 2], [5, 6], num_steps=3, guidance_scale=2.0)
    alone = generate(tiny_dit, [2], [6], num_steps=3, guidance_scale=2.0)
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both[0], both[1])


def test_batched_and_separate_cfg_agree(tiny_dit):
    a = generate(tiny_dit, [0, 1], [0, 1], num_steps=3, guidance_scale=3.0, cfg_mode="batched")
    b = generate(tiny_dit, [0, 1], [0, 1], num_steps=3, guidance_scale=3.0, cfg_mode="separate")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_guidance_changes_output(tiny_dit):
    a = generate(tiny_dit, [0], [0], num_steps=3, guidance_scale=1.0)
    b = generate(tiny_dit, [0], [0], num_steps=3, guidance_scale=4.0)
    assert not torch.allclose(a, b)


def test_callback_and_progress(tiny_dit):
    calls = []
    generate(tiny_dit, [0], [0], num_steps=4, progress=True, callback=lambda i, n, t, x: calls.append((i, n, t)))
    assert [c[0] for c in calls] == [0, 1, 2, 3] and calls[0][1] == 4 and calls[0][2] == 1000.0


def test_diffusers_scheduler(tiny_dit):
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    for sched in (FlowMatchEulerDiscreteScheduler(), DDIMScheduler()):
        cond = tiny_dit.make_condition([0], torch.device("cpu"))
        out = sample(tiny_dit.transformer, cond, seeds=[0], latent_shape=tiny_dit.latent_shape,
                     num_steps=3, scheduler=sched, adapter=tiny_dit.adapter)
        assert out.shape == (1, *tiny_dit.latent_shape) and torch.isfinite(out).all()


def test_bad_inputs(tiny_dit):
    with pytest.raises(DiffspeedError, match="steps must be a positive"):
        generate(tiny_dit, [0], [0], num_steps=0)
    with pytest.raises(DiffspeedError, match="guidance scale must be >= 0"):
        generate(tiny_dit, [0], [0], num_steps=2, guidance_scale=-1)
    with pytest.raises(DiffspeedError, match="one label per seed"):
        generate(tiny_dit, [0, 1], [0], num_steps=2)
    cond = tiny_dit.make_condition([0], torch.device("cpu"))
    cond.uncond = None
    with pytest.raises(DiffspeedError, match="unconditional"):
        sample(tiny_dit.transformer, cond, seeds=[0], num_steps=2, guidance_scale=3.0)


def test_nan_output_is_refused(tiny_dit):
    block = tiny_dit.adapter.blocks(tiny_dit.transformer)[0][1]
    h = wrap_forward(block, lambda inner, *a, **k: inner(*a, **k) * float("nan"))
    with pytest.raises(NonFiniteOutputError):
        generate(tiny_dit, [0], [0], num_steps=2)
    h.remove()
