import math

import pytest
import torch
import torch.nn.functional as F

import diffspeed
from diffspeed.errors import DiffspeedError
from diffspeed.kernels import (
    block_selection,
    block_sparse_attention,
    flex_available,
    flex_block_sparse_attention,
    masked_block_attention_dense,
)
from diffspeed.kernels.sparse_attn import _forced
from diffspeed.methods import SparseAttentionConfig
from diffspeed.sampler import generate

from method_tester import MethodTests


def _rand_qkv(n, b=2, h=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) for _ in range(3)]


def _clustered_qkv(n=128, b=1, h=2, d=16, cluster=16, amp=0.9, noise=0.5, seed=0):
    """Tokens in runs of ``cluster`` share a random centre: attention is peaked on the own run and
    its (shuffled) look-alikes. Random q/k give flat attention maps where no block can be dropped."""
    g = torch.Generator().manual_seed(seed)
    n_clusters = -(-n // cluster)
    centres = torch.randn(b, h, n_clusters, d, generator=g) * amp
    tok = torch.arange(n) // cluster
    base = centres[:, :, tok]
    q = base + noise * torch.randn(b, h, n, d, generator=g)
    k = base + noise * torch.randn(b, h, n, d, generator=g)
    v = torch.randn(b, h, n, d, generator=g)
    return q, k, v


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("n,block", [(64, 16), (50, 16), (7, 16), (130, 32), (96, 8)])
def test_threshold_zero_equals_dense_sdpa(n, block):
    q, k, v = _rand_qkv(n)
    out, density = block_sparse_attention(q, k, v, block_size=block, threshold=0.0, return_density=True)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert density.item() == 1.0


def test_threshold_zero_with_pattern_is_still_dense():
    q, k, v = _rand_qkv(70)
    out = block_sparse_attention(q, k, v, block_size=16, threshold=0.0, local_window=1, global_tokens=5)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_random_inputs_are_flat_and_keep_every_block():
    # random q/k: pooled scores are near 0 for every block, the estimated mass is spread evenly
    q, k, v = _rand_qkv(128, b=1)
    _, density = block_sparse_attention(q, k, v, block_size=16, threshold=0.05, return_density=True)
    assert density.item() > 0.9


def test_error_grows_with_threshold_and_density_drops_on_structured_inputs():
    q, k, v = _clustered_qkv()
    ref = F.scaled_dot_product_attention(q, k, v)
    errs, dens = [], []
    for thr in (0.0, 0.01, 0.05, 0.2, 0.6):
        out, d = block_sparse_attention(q, k, v, block_size=16, threshold=thr, return_density=True)
        errs.append(_rel_err(out, ref))
        dens.append(d.item())
    assert errs[0] < 1e-5 and dens[0] == 1.0
    assert all(b >= a - 1e-6 for a, b in zip(errs, errs[1:])), errs
    assert all(b <= a for a, b in zip(dens, dens[1:])), dens
    assert dens[-1] < 0.6, dens
    assert errs[1] < 0.05 and errs[-1] < 0.5, errs


def test_global_local_pattern_matches_masked_dense():
    n, bs = 90, 16  # ragged last block
    q, k, v = _rand_qkv(n)
    nb = math.ceil(n / bs)
    # an enormous threshold stops right after the forced (local + global) blocks
    out, density = block_sparse_attention(q, k, v, block_size=bs, threshold=1e30, local_window=1,
                                          global_tokens=20, return_density=True)
    idx = torch.arange(nb)
    kept = ((idx[:, None] - idx[None, :]).abs() <= 1) | (idx[None, :] < 2)  # 20 tokens -> 2 blocks
    assert torch.equal(_forced(nb, bs, 1, 20, "cpu"), kept)
    tok = torch.arange(n) // bs
    mask = kept[tok[:, None], tok[None, :]]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert abs(density.item() - kept.float().mean().item()) < 1e-6


def test_selection_keeps_forced_blocks_and_shrinks_with_threshold():
    q, k, _ = _clustered_qkv()
    full = block_selection(q, k, block_size=16, threshold=0.0)
    assert full.all()
    loose = block_selection(q, k, block_size=16, threshold=0.3, local_window=1, global_tokens=1)
    tight = block_selection(q, k, block_size=16, threshold=0.05, local_window=1, global_tokens=1)
    assert loose.float().mean() < 1 and (loose <= tight).all()
    assert loose[..., _forced(8, 16, 1, 1, "cpu")].all()


@pytest.mark.skipif(not flex_available(), reason="this torch has no flex_attention")
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("n", [64, 50])
def test_flex_matches_reference(n):
    # flex runs on CPU through its eager fallback (no compiled kernel): a correctness check only
    q, k, v = _clustered_qkv(n=n, cluster=8)
    kw = dict(block_size=16, local_window=1, global_tokens=3)
    dense_ref = block_sparse_attention(q, k, v, threshold=0.0, **kw)
    torch.testing.assert_close(flex_block_sparse_attention(q, k, v, threshold=0.0, **kw), dense_ref,
                               rtol=1e-5, atol=1e-5)
    kept = block_selection(q, k, threshold=0.3, **kw)
    out, density = flex_block_sparse_attention(q, k, v, threshold=0.3, return_density=True, **kw)
    torch.testing.assert_close(out, masked_block_attention_dense(q, k, v, kept, block_size=16),
                               rtol=1e-5, atol=1e-5)
    assert density.item() == kept.float().mean().item()
    pattern = block_sparse_attention(q, k, v, threshold=1e30, **kw)
    nb = math.ceil(n / 16)
    forced = _forced(nb, 16, 1, 3, "cpu").expand(q.shape[0], q.shape[1], nb, nb)
    torch.testing.assert_close(masked_block_attention_dense(q, k, v, forced, block_size=16), pattern,
                               rtol=1e-5, atol=1e-5)


def test_kernel_errors():
    q, k, v = _rand_qkv(32)
    with pytest.raises(ValueError, match="cross-attention"):
        block_sparse_attention(q, k[:, :, :16], v[:, :, :16])
    with pytest.raises(ValueError, match="block_size"):
        block_sparse_attention(q, k, v, block_size=0)
    with pytest.raises(ValueError, match="threshold"):
        block_sparse_attention(q, k, v, threshold=-1)


class TestSparseAttentionWan(MethodTests):
    model_name = "tiny-wan"  # 48 video tokens: 6 blocks of 8
    steps = 4
    changed_stat = "attention_calls_sparse"

    def make_config(self):
        return SparseAttentionConfig(block_size=8, threshold=0.3, min_tokens=16, backend="reference")


def test_wan_threshold_zero_is_exact_and_stats_count(tmp_path):
    from diffspeed.models.loading import load_model

    loaded = load_model("tiny-wan")
    base = generate(loaded, [0], [0], num_steps=3)
    with diffspeed.apply(loaded.transformer, SparseAttentionConfig(block_size=8, threshold=0.0, min_tokens=16)) as h:
        out = generate(loaded, [0], [0], num_steps=3)
    torch.testing.assert_close(out, base, rtol=1e-4, atol=1e-4)
    assert h.stats["attention_calls_sparse"] > 0 and h.stats["mean_density"] == 1.0
    # sequences shorter than min_tokens stay dense and exact
    with diffspeed.apply(loaded.transformer, SparseAttentionConfig(block_size=8, threshold=0.5, min_tokens=10_000)) as h:
        out = generate(loaded, [0], [0], num_steps=3)
    assert torch.equal(out, base)
    assert h.stats["attention_calls_sparse"] == 0 and h.stats["attention_calls_dense"] > 0


@pytest.mark.parametrize("model_name", ["tiny-flux", "tiny-cogvideox"])
def test_runs_on_other_processor_families(model_name):
    # Flux routes through dispatch_attention_fn, CogVideoX through F.scaled_dot_product_attention
    from diffspeed.models.loading import load_model

    loaded = load_model(model_name)
    base = generate(loaded, [0], [0], num_steps=2)
    cfg = SparseAttentionConfig(block_size=8, threshold=0.3, min_tokens=16, backend="reference")
    with diffspeed.apply(loaded.transformer, cfg) as h:
        out = generate(loaded, [0], [0], num_steps=2)
    assert torch.isfinite(out).all() and h.stats["attention_calls_sparse"] > 0
    assert 0 < h.stats["mean_density"] < 1
    assert torch.equal(generate(loaded, [0], [0], num_steps=2), base)


def test_unsupported_processor_says_why():
    from diffspeed.models.loading import load_model

    class OddProcessor:
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return hidden_states

    loaded = load_model("tiny-dit")
    for _, module in loaded.adapter.attention_modules(loaded.transformer):
        module.processor = OddProcessor()
    with pytest.raises(DiffspeedError, match="OddProcessor calls neither"):
        diffspeed.apply(loaded.transformer, SparseAttentionConfig())


def test_bad_config_values():
    with pytest.raises(DiffspeedError, match="threshold must be >= 0"):
        SparseAttentionConfig(threshold=-0.1)
    with pytest.raises(DiffspeedError, match="threshold must be < 1"):
        SparseAttentionConfig(threshold=1.5)
    with pytest.raises(DiffspeedError, match="block_size must be an int > 0"):
        SparseAttentionConfig(block_size=0)
    with pytest.raises(DiffspeedError, match="backend must be one of"):
        SparseAttentionConfig(backend="triton")
    with pytest.raises(DiffspeedError, match="local_window"):
        SparseAttentionConfig(local_window=-1)
    with pytest.raises(DiffspeedError, match="global_tokens"):
        SparseAttentionConfig(global_tokens=-1)
    with pytest.raises(DiffspeedError, match="min_tokens"):
        SparseAttentionConfig(min_tokens=0)


def test_sdpa_router_dense_fallback_passes_keywords():
    """The rerouted F.scaled_dot_product_attention falls back to torch's SDPA (which takes ``scale`` and
    ``enable_gqa`` as keywords only) both outside a sparse module and for ineligible calls."""
    import torch.nn.functional as F

    from diffspeed.methods.sparse_attention import _ACTIVE, _make_sdpa_router

    router = _make_sdpa_router(F.scaled_dot_product_attention)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    assert torch.equal(router(q, k, v, scale=0.3), ref)  # no active sparse module
    stats = {"attention_calls_dense": 0, "attention_calls_sparse": 0, "mean_density": 0.0}
    token = _ACTIVE.set((SparseAttentionConfig(block_size=8, threshold=0.3, min_tokens=10_000), stats))
    try:
        assert torch.equal(router(q, k, v, None, 0.0, False, scale=0.3), ref)  # too short: dense
    finally:
        _ACTIVE.reset(token)
    assert stats["attention_calls_dense"] == 1


def test_f_routed_family_dense_fallback_is_exact():
    """CogVideoX's processor calls F.scaled_dot_product_attention: with every call below min_tokens the
    method must fall back to dense SDPA and match the unmodified model exactly."""
    from diffspeed.models.loading import load_model

    loaded = load_model("tiny-cogvideox")
    base = generate(loaded, [0], [0], num_steps=2)
    with diffspeed.apply(loaded.transformer, SparseAttentionConfig(block_size=8, threshold=0.3, min_tokens=10_000)) as h:
        out = generate(loaded, [0], [0], num_steps=2)
    assert h.stats["attention_calls_dense"] > 0 and h.stats["attention_calls_sparse"] == 0
    assert torch.equal(out, base)
