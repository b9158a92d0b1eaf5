import types

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

import diffspeed
from diffspeed.errors import DiffspeedError
from diffspeed.methods import SlicingConfig
from diffspeed.methods.slicing import _chunked_call, enable_vae_memory_savers
from diffspeed.models.loading import load_model
from diffspeed.sampler import generate

from method_tester import MethodTests

ZOO = ["tiny-dit", "tiny-pixart", "tiny-sd3", "tiny-flux", "tiny-wan", "tiny-cogvideox"]


class TestSlicingDiT(MethodTests):
    expect_change = False
    changed_stat = "ff_calls_sliced"
    steps = 4

    def make_config(self):
        # tiny-dit has 16 tokens, tiny-wan 48: both chunk sizes are smaller
        return SlicingConfig(chunk_tokens=4, attention_query_chunk=5)


class TestSlicingWan(TestSlicingDiT):
    model_name = "tiny-wan"


@pytest.mark.parametrize("model_name", ZOO)
def test_exact_on_every_zoo_model(model_name):
    loaded = load_model(model_name)
    base = generate(loaded, [0, 1], [0, 1], num_steps=3)
    with diffspeed.apply(loaded.transformer, SlicingConfig(chunk_tokens=3, attention_query_chunk=5)) as h:
        out = generate(loaded, [0, 1], [0, 1], num_steps=3)
    assert h.stats["ff_calls_sliced"] > 0 and h.stats["attn_calls_sliced"] > 0, h.stats
    rel = ((out - base).abs().max() / base.abs().max()).item()
    assert rel <= 1e-5, f"{model_name}: sliced output differs by {rel:.3g} relative"
    assert torch.equal(generate(loaded, [0, 1], [0, 1], num_steps=3), base)


def test_flux_single_blocks_skipped_with_reason():
    loaded = load_model("tiny-flux")
    with diffspeed.apply(loaded.transformer, SlicingConfig(chunk_tokens=2)) as h:
        n_single = len(loaded.transformer.single_transformer_blocks)
        assert n_single > 0
        assert sum("fused" in note for note in h.notes) == n_single
        assert h.stats["ff_modules"] == 2 * len(loaded.transformer.transformer_blocks)


def test_attention_off_and_ff_only_paths(tiny_dit):
    with diffspeed.apply(tiny_dit.transformer, SlicingConfig(chunk_tokens=4, attention_query_chunk=0)) as h:
        generate(tiny_dit, [0], [0], num_steps=2)
    assert h.stats["attn_modules"] == 0 and h.stats["attn_calls_sliced"] == 0 and h.stats["ff_calls_sliced"] > 0
    with diffspeed.apply(tiny_dit.transformer, SlicingConfig(chunk_tokens=10_000, attention_query_chunk=4)) as h:
        generate(tiny_dit, [0], [0], num_steps=2)
    assert h.stats["ff_calls_sliced"] == 0 and h.stats["attn_calls_sliced"] > 0


def test_cross_attention_left_alone():
    loaded = load_model("tiny-pixart")
    with diffspeed.apply(loaded.transformer, SlicingConfig(chunk_tokens=4, attention_query_chunk=4)) as h:
        attn2 = loaded.transformer.transformer_blocks[0].attn2
        attn1 = loaded.transformer.transformer_blocks[0].attn1
        assert "forward" not in attn2.__dict__ and "forward" in attn1.__dict__
    assert h.stats["attn_modules"] == len(loaded.transformer.transformer_blocks)


def test_routing_restores_module_globals():
    import diffusers.models.attention_dispatch as dispatch_mod
    import diffusers.models.attention_processor as ap
    import diffusers.models.transformers.transformer_wan as wan_mod

    loaded = load_model("tiny-wan")
    # wan_grouping replaces the Wan processor instead of routing its globals: test the routing path
    cfg = SlicingConfig(chunk_tokens=4, attention_query_chunk=4, wan_grouping=False)
    with diffspeed.apply(loaded.transformer, cfg) as h:
        seen = []
        blk = loaded.transformer.blocks[0]
        # to_q runs inside the attention forward, while the routing is active
        hook = blk.attn1.to_q.register_forward_hook(lambda *a: seen.append(wan_mod.dispatch_attention_fn))
        generate(loaded, [0], [0], num_steps=2)
        hook.remove()
        assert seen and all(fn is not dispatch_mod.dispatch_attention_fn for fn in seen), "not routed during forward"
        assert wan_mod.dispatch_attention_fn is dispatch_mod.dispatch_attention_fn
        assert ap.F is F
    assert h.stats["attn_calls_sliced"] > 0


def test_routing_restored_after_error(tiny_dit):
    import diffusers.models.attention_processor as ap

    with diffspeed.apply(tiny_dit.transformer, SlicingConfig(attention_query_chunk=2)):
        attn = tiny_dit.transformer.transformer_blocks[0].attn1
        with pytest.raises(Exception):
            attn(torch.randn(1, 16, 7))  # wrong width
        assert ap.F is F


def test_chunked_call_matches_sdpa_with_masks():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 11, 8), torch.randn(2, 3, 13, 8), torch.randn(2, 3, 13, 8)
    stats = {"attn_calls_sliced": 0}
    masks = [None, torch.randn(2, 1, 11, 13), torch.randn(1, 1, 1, 13), torch.rand(2, 3, 11, 13) > 0.2]
    for mask in masks:
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = _chunked_call(F.scaled_dot_product_attention, -2, 4, stats, q, k, v, (), {"attn_mask": mask})
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        out = _chunked_call(F.scaled_dot_product_attention, -2, 4, stats, q, k, v, (mask,), {})
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert stats["attn_calls_sliced"] == 2 * len(masks)
    # causal: passed through unchanged
    q2 = torch.randn(1, 2, 9, 8)
    ref = F.scaled_dot_product_attention(q2, q2, q2, is_causal=True)
    out = _chunked_call(F.scaled_dot_product_attention, -2, 4, stats, q2, q2, q2, (), {"is_causal": True})
    assert torch.equal(out, ref) and stats["attn_calls_sliced"] == 2 * len(masks)


class _PeakNumel(TorchDispatchMode):
    """Largest tensor produced by any op while ``where`` is set (a CPU proxy for peak activation memory)."""

    def __init__(self):
        super().__init__()
        self.where = None
        self.peak = {"ff": 0, "attn": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.where:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.peak[self.where] = max(self.peak[self.where], t.numel())
        return out


def _measure_peaks(loaded, latents):
    model, adapter = loaded.transformer, loaded.adapter
    mode = _PeakNumel()
    hooks = []

    def tag(module, kind):
        hooks.append(module.register_forward_pre_hook(lambda *a: setattr(mode, "where", kind)))
        hooks.append(module.register_forward_hook(lambda *a: setattr(mode, "where", None)))

    for _, block, _ in adapter.blocks(model):
        for name in ("ff", "ffn"):
            if getattr(block, name, None) is not None:
                tag(getattr(block, name), "ff")
    for _, attn in adapter.attention_modules(model):
        if not getattr(attn, "is_cross_attention", False):
            tag(attn, "attn")
    cond, _ = adapter.dummy_condition(model, latents.shape[0], torch.Generator().manual_seed(0))
    try:
        # the math backend materialises the score matrix, as many GPU fallbacks do
        with sdpa_kernel(SDPBackend.MATH), mode, torch.no_grad():
            out = adapter.predict(model, latents, torch.tensor([500.0]), cond)
    finally:
        for h in hooks:
            h.remove()
    return out, mode.peak


def test_largest_intermediate_shrinks(tiny_dit):
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))  # 256 tokens
    base, peak_base = _measure_peaks(tiny_dit, latents)
    with diffspeed.apply(tiny_dit.transformer, SlicingConfig(chunk_tokens=32, attention_query_chunk=32)) as h:
        out, peak_sliced = _measure_peaks(tiny_dit, latents)
    assert h.stats["ff_calls_sliced"] > 0 and h.stats["attn_calls_sliced"] > 0
    torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-6)
    # measured: ff 32768 -> 8192 (4x), attention 131072 -> 16384 (8x)
    assert peak_base["ff"] >= 2 * peak_sliced["ff"], (peak_base, peak_sliced)
    assert peak_base["attn"] >= 2 * peak_sliced["attn"], (peak_base, peak_sliced)


def test_bad_config_values():
    with pytest.raises(DiffspeedError, match="chunk_tokens must be a positive integer"):
        SlicingConfig(chunk_tokens=0)
    with pytest.raises(DiffspeedError, match="chunk_tokens"):
        SlicingConfig(chunk_tokens=-8)
    with pytest.raises(DiffspeedError, match="chunk_tokens"):
        SlicingConfig(chunk_tokens=1.5)
    with pytest.raises(DiffspeedError, match="attention_query_chunk .* or 0"):
        SlicingConfig(attention_query_chunk=-1)
    with pytest.raises(DiffspeedError, match="vae"):
        SlicingConfig(vae="yes")
    assert SlicingConfig(attention_query_chunk=0).attention_query_chunk == 0


def test_vae_helper_on_stub_and_missing_vae():
    calls = []
    vae = types.SimpleNamespace(use_tiling=False, use_slicing=False)
    vae.enable_tiling = lambda: calls.append("tile+")
    vae.disable_tiling = lambda: calls.append("tile-")
    vae.enable_slicing = lambda: calls.append("slice+")
    vae.disable_slicing = lambda: calls.append("slice-")
    undo = enable_vae_memory_savers(types.SimpleNamespace(vae=vae))
    assert calls == ["tile+", "slice+"]
    undo()
    assert calls == ["tile+", "slice+", "slice-", "tile-"]
    enable_vae_memory_savers(types.SimpleNamespace())()  # no VAE: nothing to do
    enable_vae_memory_savers(types.SimpleNamespace(vae=object()))()  # VAE without the methods


def test_vae_helper_on_tiny_autoencoder():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, sample_size=32)
    pipe = types.SimpleNamespace(vae=vae)
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        base = vae.decode(latents).sample
        undo = enable_vae_memory_savers(pipe, tiling=False)
        assert vae.use_slicing
        sliced = vae.decode(latents).sample
        undo()
    assert not vae.use_slicing and not vae.use_tiling
    torch.testing.assert_close(sliced, base, rtol=1e-5, atol=1e-5)
    undo = enable_vae_memory_savers(pipe)
    assert vae.use_slicing and vae.use_tiling
    undo()
    assert not vae.use_slicing and not vae.use_tiling


# ---- Wan operator grouping ----------------------------------------------------------------------


def _wan_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 16, 16, generator=g).to(dtype)  # 5 * 8 * 8 = 320 tokens, batch 2
    enc = torch.randn(2, 8, 24, generator=g).to(dtype)
    return x, torch.tensor([500.0, 250.0]), enc


def _wan_forward(model, inputs):
    x, t, enc = inputs
    with torch.no_grad():
        return model(x, t, enc, return_dict=False)[0]


def test_wan_grouped_attention_exact_used_and_removed():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from diffspeed.methods.slicing import _WanGroupedAttnProcessor

    model = load_model("tiny-wan").transformer
    inputs = _wan_inputs()
    base = _wan_forward(model, inputs)
    originals = {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}
    calls = {"to_q": 0, "to_k": 0, "norm1": 0}
    blk = model.blocks[0]
    hooks = [getattr(blk.attn1, n).register_forward_hook(lambda *a, n=n: calls.__setitem__(n, calls[n] + 1))
             for n in ("to_q", "to_k")]
    hooks.append(blk.norm1.register_forward_hook(lambda *a: calls.__setitem__("norm1", calls["norm1"] + 1)))
    cfg = SlicingConfig(chunk_tokens=48, attention_query_chunk=40)
    with diffspeed.apply(model, cfg) as h:
        assert all(type(m.processor) is _WanGroupedAttnProcessor for m in originals and
                   [model.get_submodule(n) for n in originals])
        out = _wan_forward(model, inputs)
    for hook in hooks:
        hook.remove()
    n_attn = 2 * len(model.blocks)
    assert h.stats["grouped_attn_modules"] == n_attn and h.stats["grouped_blocks"] == len(model.blocks)
    assert h.stats["attn_calls_grouped"] == n_attn and h.stats["block_calls_grouped"] == len(model.blocks), h.stats
    # 320 tokens: q and k projections ran per 40-token chunk, the block's norm1 per 48-token chunk
    assert calls == {"to_q": 8, "to_k": 8, "norm1": 7}, calls
    assert torch.equal(out, base), (out - base).abs().max()
    # remove() puts the very same processor objects back and the outputs are bit-identical
    assert {n: model.get_submodule(n).processor for n in originals} == originals
    assert all(type(p) is WanAttnProcessor for p in originals.values())
    assert torch.equal(_wan_forward(model, inputs), base)


def test_wan_grouping_bf16_and_fused_projections_exact():
    model = load_model("tiny-wan", dtype=torch.bfloat16).transformer
    for blk in model.blocks:
        blk.attn1.fuse_projections()
        blk.attn2.fuse_projections()
    inputs = _wan_inputs(torch.bfloat16)
    base = _wan_forward(model, inputs)
    with diffspeed.apply(model, SlicingConfig(chunk_tokens=30, attention_query_chunk=64)) as h:
        out = _wan_forward(model, inputs)
    assert h.stats["attn_calls_grouped"] == 2 * len(model.blocks)
    assert torch.equal(out, base), (out.float() - base.float()).abs().max()


def test_wan_unknown_processor_refused():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    class MyProcessor(WanAttnProcessor):
        pass

    model = load_model("tiny-wan").transformer
    inputs = _wan_inputs()
    custom = MyProcessor()
    model.blocks[1].attn1.set_processor(custom)
    before = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    with pytest.raises(DiffspeedError, match=r"blocks\.1\.attn1 \(.*MyProcessor\).*wan_grouping=False"):
        diffspeed.apply(model, SlicingConfig(chunk_tokens=48, attention_query_chunk=40))
    # nothing was installed, and the method is not recorded as applied
    assert {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")} == before
    assert all("forward" not in blk.__dict__ for blk in model.blocks)
    base = _wan_forward(model, inputs)
    with diffspeed.apply(model, SlicingConfig(chunk_tokens=48, attention_query_chunk=40, wan_grouping=False)) as h:
        out = _wan_forward(model, inputs)
    assert h.stats["attn_calls_grouped"] == 0 and h.stats["attn_calls_sliced"] > 0
    torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-6)
    assert model.blocks[1].attn1.processor is custom


def test_wan_grouped_processor_passes_through_after_remove_and_backend_setter():
    model = load_model("tiny-wan").transformer
    attn = model.blocks[0].attn1
    original = attn.processor
    h = diffspeed.apply(model, SlicingConfig(chunk_tokens=48, attention_query_chunk=40))
    grouped = attn.processor
    grouped._attention_backend = "native"  # what set_attention_backend does: lands on the original
    assert original._attention_backend == "native" and grouped._attention_backend == "native"
    original._attention_backend = None
    h.remove()
    assert attn.processor is original
    # re-installed by someone else after remove(): a plain pass-through, counts nothing
    attn.processor = grouped
    hs = torch.randn(1, 320, 32)
    with torch.no_grad():
        assert torch.equal(attn(hs), original(attn, hs))
    assert h.stats["attn_calls_grouped"] == 0
    attn.processor = original


class _WideTemporaries(TorchDispatchMode):
    """Largest freshly allocated float32/float64 tensor (numel) produced inside the Wan blocks."""

    def __init__(self):
        super().__init__()
        self.on = False
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.on:
            flat = torch.utils._pytree.tree_leaves((args, kwargs))
            seen = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(out):
                if (isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float64)
                        and t.untyped_storage().data_ptr() not in seen):  # views and in-place ops skipped
                    self.peak = max(self.peak, t.numel())
        return out


def _wide_peak(model, inputs):
    mode = _WideTemporaries()
    hooks = []
    for blk in model.blocks:
        hooks.append(blk.register_forward_pre_hook(lambda *a: setattr(mode, "on", True)))
        hooks.append(blk.register_forward_hook(lambda *a: setattr(mode, "on", False)))
    try:
        with mode:
            out = _wan_forward(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return out, mode.peak


def test_wan_grouping_shrinks_full_length_fp32_fp64_temporaries():
    # bf16 model: the full-sequence float32 modulation / residuals and the float64 rotary temporaries
    # are what grouping removes; with it the widest such tensor has one chunk's rows
    model = load_model("tiny-wan", dtype=torch.bfloat16).transformer
    inputs = _wan_inputs(torch.bfloat16)
    base, peak_base = _wide_peak(model, inputs)
    with diffspeed.apply(model, SlicingConfig(chunk_tokens=32, attention_query_chunk=32)):
        out, peak_grouped = _wide_peak(model, inputs)
    assert torch.equal(out, base)
    assert peak_base >= 2 * 320 * 32 and peak_grouped <= 2 * 32 * 32, (peak_base, peak_grouped)
    with diffspeed.apply(model, SlicingConfig(chunk_tokens=32, attention_query_chunk=32, wan_grouping=False)):
        _, peak_plain = _wide_peak(model, inputs)
    assert peak_plain == peak_base  # plain FF / SDPA chunking leaves these full-length
