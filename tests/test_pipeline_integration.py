"""Methods attached to ``pipe.transformer`` of a real diffusers pipeline: its own loop runs them.

The context runs in auto mode (timesteps read from each call): a new request resets the state, the
batched CFG call of DiTPipeline works, and remove() gives the pipeline's outputs back bit-exactly.
"""

import torch

import diffspeed
from diffspeed.methods import StepCacheConfig
from diffspeed.models.zoo import construct, rerandomize_zero_params_


def _pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    # DiTPipeline hard-codes the null class as 1000, so this tiny DiT has 1000 classes
    transformer = construct("DiTTransformer2DModel", dict(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                            out_channels=8, num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000))
    rerandomize_zero_params_(transformer, seed=0)
    transformer.eval()
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=8, sample_size=8).eval()
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())


def _run(pipe, steps=8):
    return pipe(class_labels=[1, 2], num_inference_steps=steps, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


def test_step_cache_on_a_diffusers_pipeline():
    pipe = _pipeline()
    base = _run(pipe)
    handle = diffspeed.apply(pipe.transformer, StepCacheConfig(threshold=1e9, warmup_steps=2))
    with diffspeed.generation(pipe.transformer, num_steps=8) as ctx:
        fast = _run(pipe)
        assert ctx.step_index == 7
    skipped = handle.stats["skipped_steps"]
    assert skipped > 0 and torch.isfinite(fast).all() and not torch.equal(fast, base)
    # a second request without declaring it: the context sees the timestep go up and resets
    again = _run(pipe)
    assert torch.equal(again, fast)
    assert handle.stats["skipped_steps"] == 2 * skipped
    # a different step count on the next request needs no manual refresh
    assert torch.isfinite(_run(pipe, steps=5)).all()
    handle.remove()
    assert torch.equal(_run(pipe), base)
