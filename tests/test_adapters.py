"""Adapters against the real diffusers classes, on the tiny zoo models."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from diffspeed.adapters import BlockIO, get_adapter, registered_model_classes
from diffspeed.adapters.flux import pack_latents, unpack_latents
from diffspeed.errors import UnsupportedModelError
from diffspeed.models.bundle import Conditioning
from diffspeed.models.zoo import ZOO, build_model, construct, rerandomize_zero_params_, zoo_names
from diffspeed.sampler import initial_noise, sample

TINY = [n for n in zoo_names() if n.startswith("tiny-")]
CPU = torch.device("cpu")
FAMILIES = {
    "DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
    "FluxTransformer2DModel", "WanTransformer3DModel", "CogVideoXTransformer3DModel",
}

_CACHE: dict = {}


def loaded(name: str):
    if name not in _CACHE:
        _CACHE[name] = build_model(name, seed=0)
    return _CACHE[name]


@pytest.fixture(autouse=True, scope="module")
def _threads():
    # tiny models gain nothing from threads, and on a shared, loaded CPU the OpenMP barriers of a
    # multi-threaded op can cost 10+ ms each: one thread keeps these tests fast and steady
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_every_family_is_registered_and_has_a_tiny_model():
    assert FAMILIES <= set(registered_model_classes())
    assert {ZOO[n].class_name for n in TINY} == FAMILIES


@pytest.mark.parametrize("name", TINY)
def test_blocks_states_and_outputs_match_real_calls(name):
    lm = loaded(name)
    model = lm.transformer
    adapter = get_adapter(model)
    assert adapter is lm.adapter
    blocks = adapter.blocks(model)
    assert blocks, "no blocks"
    for group in adapter.block_groups(model):
        assert len(group.blocks) >= 2, group.name
    assert len({id(b) for _, b, _ in blocks}) == len(blocks)

    calls = []
    handles = [
        block.register_forward_hook(
            lambda mod, args, kwargs, out, fqn=fqn, io=io: calls.append((fqn, io, args, kwargs, out)),
            with_kwargs=True,
        )
        for fqn, block, io in blocks
    ]
    try:
        cond = lm.make_condition([0, 1], CPU).cond
        x = torch.randn(2, *lm.latent_shape, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            adapter.predict(model, x, torch.full((2,), 700.0), cond)
    finally:
        for h in handles:
            h.remove()

    # execution order == adapter order, each block exactly once
    assert [c[0] for c in calls] == [fqn for fqn, _, _ in blocks]
    text_len = ZOO[name].text_len
    prev_hidden = prev_encoder = None
    for fqn, io, args, kwargs, out in calls:
        assert isinstance(io, BlockIO)
        hidden, encoder = io.get_states(args, kwargs)
        assert isinstance(hidden, torch.Tensor) and hidden.dim() == 3 and hidden.shape[0] == 2, fqn
        if prev_hidden is not None:  # the hidden states really flow from block to block
            assert torch.equal(hidden, prev_hidden), fqn
        if io.encoder_arg is None:
            assert encoder is None
        else:
            assert isinstance(encoder, torch.Tensor) and encoder.shape[:2] == (2, text_len), fqn
            if prev_encoder is not None:
                assert torch.equal(encoder, prev_encoder), fqn
        out_hidden, out_encoder = io.split_output(out)
        assert out_hidden.shape == hidden.shape, fqn
        if out_encoder is not None:
            assert out_encoder.shape == encoder.shape, fqn
        rebuilt = io.make_output(out_hidden, out_encoder)
        if isinstance(out, tuple):
            assert isinstance(rebuilt, tuple) and len(rebuilt) == len(out)
            assert all(a is b for a, b in zip(rebuilt, out)), fqn
        else:
            assert rebuilt is out
        prev_hidden, prev_encoder = out_hidden, out_encoder


@pytest.mark.parametrize("name", TINY)
def test_timestep_from_call(name):
    lm = loaded(name)
    model, adapter = lm.transformer, lm.adapter
    seen = []
    handle = model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(adapter.timestep_from_call(args, kwargs)), with_kwargs=True
    )
    try:
        t = torch.tensor([250.0, 800.0])
        with torch.no_grad():
            adapter.predict(model, torch.randn(2, *lm.latent_shape), t, lm.make_condition([0, 1], CPU).cond)
    finally:
        handle.remove()
    assert len(seen) == 1
    expected = t * adapter.timestep_scale / 1000.0
    torch.testing.assert_close(seen[0].float(), expected)

    # positional calls: the timestep sits where the real forward signature puts it
    params = list(inspect.signature(type(model).forward).parameters)[1:]  # drop self
    pos = params.index("timestep")
    sentinel = torch.tensor([1.0])
    args = tuple(sentinel if i == pos else object() for i in range(pos + 1))
    assert adapter.timestep_from_call(args, {}) is sentinel
    assert adapter.timestep_from_call((object(),), {"timestep": sentinel}) is sentinel
    assert adapter.timestep_from_call((object(),), {}) is None


@pytest.mark.parametrize("name", TINY)
def test_attention_modules(name):
    lm = loaded(name)
    attn = lm.adapter.attention_modules(lm.transformer)
    assert attn
    for fqn, _, _ in lm.adapter.blocks(lm.transformer):
        assert any(a.startswith(fqn + ".") for a, _ in attn), fqn


@pytest.mark.parametrize("name", TINY)
def test_sample_with_cfg(name):
    lm = loaded(name)
    model = lm.transformer
    assert lm.adapter.default_latent_shape(model) == lm.latent_shape
    condition = lm.make_condition([1, 2], CPU)
    outs = {}
    for mode in ("batched", "separate"):
        out = sample(model, Conditioning(condition.cond, condition.uncond), seeds=[0, 1], num_steps=3,
                     guidance_scale=2.0, cfg_mode=mode)
        assert out.shape == (2, *lm.latent_shape)
        assert torch.isfinite(out).all()
        assert out.abs().max() > 0
        assert not torch.allclose(out[0], out[1])
        outs[mode] = out
    noise = initial_noise([0, 1], lm.latent_shape, CPU, torch.float32)
    # the model really moved the latents (a zero-output model would return the noise)
    assert (outs["batched"] - noise).abs().mean() > 0.05
    torch.testing.assert_close(outs["batched"], outs["separate"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_dummy_condition_and_output_magnitude(name):
    lm = loaded(name)
    model, adapter = lm.transformer, lm.adapter
    gen = torch.Generator().manual_seed(0)
    cond, uncond = adapter.dummy_condition(model, 2, gen)
    assert set(cond) == set(uncond)
    x = torch.randn(2, *lm.latent_shape, generator=torch.Generator().manual_seed(1))
    t = torch.full((2,), 500.0)
    with torch.no_grad():
        out_c = adapter.predict(model, x, t, cond)
        out_u = adapter.predict(model, x, t, uncond)
    assert out_c.shape == x.shape == out_u.shape
    assert 0.05 < out_c.std().item() < 20.0  # order-1 outputs: no branch is trivially zero
    assert not torch.allclose(out_c, out_u)


def test_dit_drops_learned_sigma_and_uses_null_class():
    lm = loaded("tiny-dit")
    model = lm.transformer
    assert model.config.out_channels == 2 * model.config.in_channels
    cond, uncond = lm.adapter.dummy_condition(model, 3)
    assert (uncond["class_labels"] == model.config.num_embeds_ada_norm).all()
    assert ((cond["class_labels"] >= 0) & (cond["class_labels"] < model.config.num_embeds_ada_norm)).all()
    x = torch.randn(3, *lm.latent_shape)
    with torch.no_grad():
        full = model(x, torch.full((3,), 10.0), cond["class_labels"], return_dict=False)[0]
        out = lm.adapter.predict(model, x, torch.full((3,), 10.0), cond)
    assert full.shape[1] == 8 and out.shape == x.shape
    torch.testing.assert_close(out, full[:, :4])


def test_flux_pack_roundtrip():
    x = torch.randn(2, 4, 6, 10)
    packed = pack_latents(x)
    assert packed.shape == (2, 15, 16)
    assert torch.equal(unpack_latents(packed, 6, 10), x)


def test_default_latent_shape_from_config():
    lm = build_model("tiny-cogvideox")
    del lm.transformer.diffspeed_latent_shape
    assert lm.adapter.default_latent_shape(lm.transformer) == (4, 3, 8, 8)
    lm = build_model("tiny-dit")
    del lm.transformer.diffspeed_latent_shape
    assert lm.adapter.default_latent_shape(lm.transformer) == (4, 8, 8)


@pytest.mark.parametrize("extra", [
    {"use_rotary_positional_embeddings": True},
    {"use_rotary_positional_embeddings": True, "patch_size_t": 2, "patch_bias": False, "sample_frames": 13,
     "ofs_embed_dim": 32},
])
def test_cogvideox_rotary_variants(extra):
    cfg = dict(ZOO["tiny-cogvideox"].config, **extra)
    model = construct("CogVideoXTransformer3DModel", cfg, seed=0)
    rerandomize_zero_params_(model, 0)
    adapter = get_adapter(model)
    shape = adapter.default_latent_shape(model)
    if "patch_size_t" in extra:
        assert shape[1] % 2 == 0
    cond, _ = adapter.dummy_condition(model, 2, torch.Generator().manual_seed(0))
    x = torch.randn(2, *shape)
    with torch.no_grad():
        out = adapter.predict(model, x, torch.full((2,), 300.0), cond)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_pixart_additional_conditions():
    # the size embedding is inner_dim // 3 wide per condition: inner_dim must be divisible by 3
    cfg = dict(ZOO["tiny-pixart"].config, use_additional_conditions=True, num_attention_heads=3,
               cross_attention_dim=48)
    model = construct("PixArtTransformer2DModel", cfg, seed=0)
    adapter = get_adapter(model)
    cond, _ = adapter.dummy_condition(model, 2)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out = adapter.predict(model, x, torch.full((2,), 300.0), cond)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_unregistered_model_raises_naming_the_class():
    class MyCustomNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

    with pytest.raises(UnsupportedModelError, match="MyCustomNet"):
        get_adapter(MyCustomNet())


def test_empty_block_list_raises():
    lm = build_model("tiny-dit")
    lm.transformer.transformer_blocks = nn.ModuleList()
    with pytest.raises(UnsupportedModelError, match=r"DiTTransformer2DModel.*empty"):
        get_adapter(lm.transformer)
