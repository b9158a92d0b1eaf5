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


# ---- remainder compensation ----------------------------------------------------------------------

from diffspeed.kernels.sparse_attn import compensated_block_attention_dense, merge_lse  # noqa: E402


def _block_constant_qkv(n=128, b=1, h=2, d=16, block=16, amp=1.2, q_noise=0.3, k_noise=0.0, seed=0):
    """Keys equal within each block (plus ``k_noise``), queries near their own block's key, random
    values: attention is peaked on a few blocks and, with k_noise=0, the pooled estimate is exact."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-n // block)
    centres = torch.randn(b, h, nb, d, generator=g) * amp
    tok = torch.arange(n) // block
    k = centres[:, :, tok] + k_noise * torch.randn(b, h, n, d, generator=g)
    q = centres[:, :, tok] + q_noise * torch.randn(b, h, n, d, generator=g)
    v = torch.randn(b, h, n, d, generator=g)
    return q, k, v


@pytest.mark.parametrize("n,block", [(64, 16), (50, 16), (130, 32)])
def test_compensated_threshold_zero_equals_dense_sdpa(n, block):
    q, k, v = _rand_qkv(n)
    ref = F.scaled_dot_product_attention(q, k, v)
    out = block_sparse_attention(q, k, v, block_size=block, threshold=0.0, compensate=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if flex_available():
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = flex_block_sparse_attention(q, k, v, block_size=block, threshold=0.0, compensate=True)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_compensation_off_is_the_default_and_unchanged():
    q, k, v = _clustered_qkv()
    a = block_sparse_attention(q, k, v, block_size=16, threshold=0.2)
    b = block_sparse_attention(q, k, v, block_size=16, threshold=0.2, compensate=False)
    assert torch.equal(a, b)
    c = block_sparse_attention(q, k, v, block_size=16, threshold=0.2, compensate=True)
    assert not torch.allclose(a, c, atol=1e-4)  # compensation must change something when blocks are skipped


def test_compensation_is_exact_for_block_constant_keys():
    # keys equal within a block: n_j exp(q . mean_k) mean_v is exactly the block's contribution
    q, k, v = _block_constant_qkv(n=100)  # ragged last block
    ref = F.scaled_dot_product_attention(q, k, v)
    for thr in (0.01, 0.05, 0.2, 0.5):
        plain, dens = block_sparse_attention(q, k, v, block_size=16, threshold=thr, return_density=True)
        comp, dens_c = block_sparse_attention(q, k, v, block_size=16, threshold=thr, compensate=True,
                                              return_density=True)
        assert dens.item() < 0.8 and dens_c.item() == dens.item()  # same blocks computed
        assert _rel_err(plain, ref) > 5e-3, thr  # something was dropped
        assert _rel_err(comp, ref) < 1e-5, (thr, _rel_err(comp, ref))


def test_compensation_reduces_error_on_noisy_block_structure():
    ref_errs = []
    for k_noise in (0.1, 0.3):
        q, k, v = _block_constant_qkv(k_noise=k_noise)
        ref = F.scaled_dot_product_attention(q, k, v)
        for thr in (0.01, 0.05, 0.2):
            plain = _rel_err(block_sparse_attention(q, k, v, block_size=16, threshold=thr), ref)
            comp = _rel_err(block_sparse_attention(q, k, v, block_size=16, threshold=thr, compensate=True), ref)
            assert comp < 0.5 * plain, (k_noise, thr, plain, comp)
            ref_errs.append(comp)
    # the clustered inputs of the other tests (spread keys, not constant within blocks): still better
    q, k, v = _clustered_qkv()
    ref = F.scaled_dot_product_attention(q, k, v)
    for thr in (0.05, 0.2, 0.6):
        plain = _rel_err(block_sparse_attention(q, k, v, block_size=16, threshold=thr), ref)
        comp = _rel_err(block_sparse_attention(q, k, v, block_size=16, threshold=thr, compensate=True), ref)
        assert comp < plain, (thr, plain, comp)


def test_reference_compensation_matches_dense_helper_on_forced_pattern():
    # an enormous threshold stops right after the forced blocks: everything else is compensated
    n, bs = 90, 16
    q, k, v = _clustered_qkv(n=n, cluster=8)
    nb = math.ceil(n / bs)
    out = block_sparse_attention(q, k, v, block_size=bs, threshold=1e30, local_window=1, global_tokens=20,
                                 compensate=True)
    kept = _forced(nb, bs, 1, 20, "cpu").expand(q.shape[0], q.shape[1], nb, nb)
    torch.testing.assert_close(out, compensated_block_attention_dense(q, k, v, kept, block_size=bs),
                               rtol=1e-5, atol=1e-5)
    # and the dense helper itself: nothing kept except the diagonal, keys constant per block -> exact
    q, k, v = _block_constant_qkv(n=64)
    eye = torch.eye(4, dtype=torch.bool).expand(1, 2, 4, 4)
    torch.testing.assert_close(compensated_block_attention_dense(q, k, v, eye, block_size=16),
                               F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_merge_lse_is_exact_split_of_softmax():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 5, 12, generator=g) * 3
    v = torch.randn(2, 12, 4, generator=g)
    full = torch.softmax(s, -1) @ v
    a, b = s[..., :5], s[..., 5:]
    out = merge_lse(torch.softmax(a, -1) @ v[:, :5], a.logsumexp(-1), torch.softmax(b, -1) @ v[:, 5:],
                    b.logsumexp(-1))
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-6)
    # an empty part (lse = -inf, out NaN) gets weight 0
    empty = torch.full((2, 5), -math.inf)
    nan_out = torch.full((2, 5, 4), float("nan"))
    torch.testing.assert_close(merge_lse(full, s.logsumexp(-1), nan_out, empty), full)


@pytest.mark.skipif(not flex_available(), reason="this torch has no flex_attention")
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("n", [64, 50])
def test_flex_compensated_matches_dense_helper_and_reference(n):
    q, k, v = _clustered_qkv(n=n, cluster=8)
    kw = dict(block_size=16, local_window=1, global_tokens=3)
    kept = block_selection(q, k, threshold=0.3, **kw)
    assert not kept.all()
    out, density = flex_block_sparse_attention(q, k, v, threshold=0.3, compensate=True, return_density=True, **kw)
    torch.testing.assert_close(out, compensated_block_attention_dense(q, k, v, kept, block_size=16),
                               rtol=1e-5, atol=1e-5)
    assert density.item() == kept.float().mean().item()
    plain = flex_block_sparse_attention(q, k, v, threshold=0.3, **kw)
    assert not torch.allclose(out, plain, atol=1e-4)
    # same kept set on both paths (forced blocks only): reference and flex agree
    ref_path = block_sparse_attention(q, k, v, threshold=1e30, compensate=True, **kw)
    flex_path = flex_block_sparse_attention(q, k, v, threshold=1e30, compensate=True, **kw)
    torch.testing.assert_close(flex_path, ref_path, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not flex_available(), reason="this torch has no flex_attention")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_compensation_exact_for_block_constant_keys_and_chunking(monkeypatch):
    import diffspeed.kernels.sparse_attn as sa

    q, k, v = _block_constant_qkv(n=100)
    ref = F.scaled_dot_product_attention(q, k, v)
    for thr in (0.05, 0.2):
        plain = flex_block_sparse_attention(q, k, v, block_size=16, threshold=thr)
        comp = flex_block_sparse_attention(q, k, v, block_size=16, threshold=thr, compensate=True)
        assert _rel_err(plain, ref) > 5e-3
        assert _rel_err(comp, ref) < 1e-5
        # nothing kept beyond a ragged chunking of the pooled part changes the result
        monkeypatch.setattr(sa, "_POOLED_CHUNK_BYTES", 1)
        torch.testing.assert_close(flex_block_sparse_attention(q, k, v, block_size=16, threshold=thr,
                                                               compensate=True), comp, rtol=1e-6, atol=1e-6)
        monkeypatch.undo()
    # bf16 in, bf16 out
    out = flex_block_sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), block_size=16, threshold=0.2,
                                      compensate=True)
    assert out.dtype == torch.bfloat16 and _rel_err(out, ref) < 0.02


def test_compensate_must_be_bool():
    q, k, v = _rand_qkv(32)
    with pytest.raises(TypeError, match="compensate must be a bool"):
        block_sparse_attention(q, k, v, threshold=0.1, compensate="yes")
    with pytest.raises(TypeError, match="compensate must be a bool"):
        block_sparse_attention(q, k, v, threshold=0.1, compensate=1)
    if flex_available():
        with pytest.raises(TypeError, match="compensate must be a bool"):
            flex_block_sparse_attention(q, k, v, threshold=0.1, compensate=None)
    with pytest.raises(DiffspeedError, match="compensate must be a bool"):
        SparseAttentionConfig(compensate="true")
    with pytest.raises(DiffspeedError, match="compensate must be a bool"):
        SparseAttentionConfig(compensate=1)
    assert SparseAttentionConfig().compensate is False
    assert SparseAttentionConfig(compensate=True).to_dict()["compensate"] is True


def test_method_threads_compensate(monkeypatch):
    """The method passes ``compensate`` to the kernel (and the output changes)."""
    import diffspeed.methods.sparse_attention as sam

    seen = []
    real = sam.block_sparse_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("compensate"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sam, "block_sparse_attention", spy)
    q, k, v = _clustered_qkv()
    cfg = SparseAttentionConfig(block_size=16, threshold=0.2, min_tokens=16, backend="reference")
    plain, _ = sam._sparse(q, k, v, None, cfg)
    comp, _ = sam._sparse(q, k, v, None, cfg.replace(compensate=True))
    assert seen == [False, True]
    ref = F.scaled_dot_product_attention(q, k, v)
    assert _rel_err(comp, ref) < _rel_err(plain, ref)


def test_wan_compensated_runs():
    from diffspeed.models.loading import load_model

    loaded = load_model("tiny-wan")
    base = generate(loaded, [0], [0], num_steps=2)
    cfg = SparseAttentionConfig(block_size=8, threshold=0.3, min_tokens=16, backend="reference", compensate=True)
    with diffspeed.apply(loaded.transformer, cfg) as h:
        out = generate(loaded, [0], [0], num_steps=2)
    assert torch.isfinite(out).all() and h.stats["attention_calls_sparse"] > 0
    assert 0 < h.stats["mean_density"] < 1
    assert torch.equal(generate(loaded, [0], [0], num_steps=2), base)
