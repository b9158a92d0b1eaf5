import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import diffspeed
from diffspeed.errors import DiffspeedError
from diffspeed.methods import TokenMergeConfig
from diffspeed.methods.token_merge import (
    bipartite_match,
    dst_indices,
    merge_count,
    merge_tokens,
    token_grid,
    unmerge_residual,
)
from diffspeed.sampler import generate

from method_tester import MethodTests, count_host_syncs


class TestTokenMergeDiT(MethodTests):
    changed_stat = "tokens_merged"

    def make_config(self):
        return TokenMergeConfig(ratio=0.5, min_tokens=4)


class TestTokenMergeWan(TestTokenMergeDiT):
    model_name = "tiny-wan"
    steps = 6


class TestTokenMergeReuse(TestTokenMergeDiT):
    """Matching reused across steps; ToMeSD-style attention-only merging."""

    def make_config(self):
        return TokenMergeConfig(ratio=0.4, min_tokens=4, reuse_steps=3, merge_mlp=False)


@pytest.mark.parametrize("model_name", ["tiny-dit", "tiny-pixart", "tiny-wan"])
def test_ratio_zero_is_bit_identical(model_name):
    from diffspeed.models.loading import load_model

    loaded = load_model(model_name)
    base = generate(loaded, [0, 1], [0, 1], num_steps=4, guidance_scale=3.0)
    with diffspeed.apply(loaded.transformer, TokenMergeConfig(ratio=0.0, min_tokens=1)) as h:
        out = generate(loaded, [0, 1], [0, 1], num_steps=4, guidance_scale=3.0)
    assert torch.equal(out, base)
    assert h.stats["tokens_merged"] == 0


@pytest.mark.parametrize("model_name", ["tiny-pixart", "tiny-wan"])
def test_merges_on_every_supported_family(model_name):
    from diffspeed.models.loading import load_model

    loaded = load_model(model_name)
    base = generate(loaded, [0], [0], num_steps=3, guidance_scale=2.0)
    for cfg in (TokenMergeConfig(ratio=0.5, min_tokens=4), TokenMergeConfig(ratio=0.5, min_tokens=4, merge_attn=False)):
        with diffspeed.apply(loaded.transformer, cfg) as h:
            out = generate(loaded, [0], [0], num_steps=3, guidance_scale=2.0)
        assert torch.isfinite(out).all() and h.stats["blocks_merged"] > 0 and h.stats["tokens_merged"] > 0
        assert not torch.equal(out, base), f"merging tokens left the output identical to the full model's ({cfg})"


def test_matching_maps_duplicates_and_counts():
    torch.manual_seed(0)
    b, n, d = 2, 8, 6
    x = torch.randn(b, n, d)
    dst = torch.tensor([0, 2, 4, 6])
    x[:, 5] = x[:, 2] * 3.0  # src 5 is parallel to dst 2 (cosine 1): merged first
    kept, assign, sizes = bipartite_match(x, dst, r=1)
    assert kept.shape == (b, n - 1) and assign.shape == (b, n) and sizes.shape == (b, n - 1)
    assert (kept != 5).all()
    assert torch.equal(assign[:, 5], assign[:, 2])  # same slot as its dst
    assert torch.equal(kept.gather(1, assign[:, 2:3]).flatten(), torch.tensor([2, 2]))
    assert torch.equal(sizes.sum(1), torch.full((b,), float(n)))
    # every kept token sits in its own slot, in original order
    assert torch.equal(kept.gather(1, assign.gather(1, kept)), kept)
    assert (kept.diff(dim=1) > 0).all()
    # merge = size-weighted mean, unmerge gives unmerged tokens their slot output exactly
    small = merge_tokens(x, assign, sizes)
    slot = assign[0, 2]
    assert torch.allclose(small[0, slot], (x[0, 2] + x[0, 5]) / 2)
    out_small = small * 2 + 1
    full = unmerge_residual(x, small, out_small, assign)
    alone = [i for i in range(n) if i not in (2, 5)]
    assert torch.equal(full[:, alone], x[:, alone] * 2 + 1)
    # merged tokens: own input + the slot's update
    assert torch.allclose(full[0, 5], x[0, 5] + (out_small[0, slot] - small[0, slot]), atol=1e-6)


def test_duplicate_tokens_merge_exactly(tiny_dit):
    """Two identical tokens merged into one slot (size 2, proportional attention) change nothing."""
    tr = tiny_dit.transformer
    block = tr.transformer_blocks[0]
    torch.manual_seed(0)
    b, n, d = 2, 16, tr.inner_dim
    x = torch.randn(b, n, d)
    x[:, 1::2] = x[:, 0::2]  # token 2k+1 duplicates token 2k
    t = torch.tensor([500, 300])
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        full = block(x, timestep=t, class_labels=labels)
        dst = torch.arange(0, n, 2)
        kept, assign, sizes = bipartite_match(x, dst, r=n // 2)
        assert torch.equal(kept, dst.expand(b, -1))  # every odd token merged into its twin
        assert torch.equal(sizes, torch.full((b, n // 2), 2.0))
        small = merge_tokens(x, assign, sizes)
        out_small = block(small, attention_mask=sizes.log()[:, None, :], timestep=t, class_labels=labels)
        merged = unmerge_residual(x, small, out_small, assign)
    assert torch.allclose(merged, full, atol=1e-5, rtol=1e-5)


def test_dst_selection_is_one_per_cell_and_seeded():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, b = dst_indices((2, 4, 6), (2, 2), g1), dst_indices((2, 4, 6), (2, 2), g2)
    assert torch.equal(a, b) and a.numel() == 2 * 2 * 3
    f, rem = a // 24, a % 24
    cells = (f * 100 + (rem // 6) // 2 * 10 + (rem % 6) // 2).tolist()
    assert len(set(cells)) == a.numel()  # exactly one per cell
    assert merge_count(256, 192, 0.3, 64) == 76
    assert merge_count(256, 192, 0.9, 64) == 192  # capped by the src set
    assert merge_count(80, 60, 0.5, 64) == 16  # keeps min_tokens
    assert merge_count(16, 12, 0.5, 64) == 0


def test_no_host_sync_in_hot_path(tiny_dit):
    names = ("item", "__bool__", "tolist", "__int__", "__float__", "__index__")
    generate(tiny_dit, [0], [0], num_steps=4, check_finite=False)  # warm-up of lazy imports
    with count_host_syncs(names) as baseline:  # the sampler's own float(sigma) reads of host tensors
        generate(tiny_dit, [0], [0], num_steps=4, check_finite=False)
    cfg = TokenMergeConfig(ratio=0.5, min_tokens=4, reuse_steps=2)
    with diffspeed.apply(tiny_dit.transformer, cfg) as h:
        generate(tiny_dit, [0], [0], num_steps=4, check_finite=False)
        with count_host_syncs() as syncs, count_host_syncs(names) as extended:
            generate(tiny_dit, [0], [0], num_steps=4, check_finite=False)
    assert syncs.n == 0
    assert extended.n == baseline.n, "token_merge added host reads of tensors"
    assert h.stats["matchings_computed"] > 0 and h.stats["matchings_reused"] > 0


def _flops(loaded, cfg):
    handle = diffspeed.apply(loaded.transformer, cfg) if cfg is not None else None
    try:
        with FlopCounterMode(display=False) as counter:
            generate(loaded, [0], [0], num_steps=1, guidance_scale=1.0)
    finally:
        if handle is not None:
            handle.remove()
    return counter.get_total_flops()


def test_flops_drop_with_ratio():
    from diffspeed.models.loading import load_model

    loaded = load_model("reference-image")  # 256 tokens, 8 blocks
    full = _flops(loaded, None)
    rel = {r: _flops(loaded, TokenMergeConfig(ratio=r)) / full for r in (0.0, 0.3, 0.5)}
    print("relative FLOPs per forward:", rel)
    assert rel[0.0] == 1.0
    # block FLOPs are linear (projections, MLP) plus quadratic (attention) in the token count; at 256
    # tokens, width 192 the linear part dominates. Measured: 0.707 (ratio 0.3), 0.505 (ratio 0.5),
    # matching (the N_src x N_dst similarity) and the patch embedding / head included.
    assert 0.6 < rel[0.3] < 0.75
    assert 0.4 < rel[0.5] < 0.56
    assert rel[0.5] < rel[0.3]


# ratio 0.3 on reference-image (6 samples, 15 steps, CFG 4): measured 22.54 dB
# (per sample 25.8 / 21.6 / 24.8 / 22.9 / 21.2 / 19.0), judge 6/6 as the full model.
# (ratio 0.5: 18.96 dB, judge 4/6; ratio 0.7: 15.61 dB, judge 2/6.)
REFERENCE_FLOOR_DB = 19.0


def test_reference_fidelity_at_ratio_0_3():
    from diffspeed.bench.metrics import psnr
    from diffspeed.models.judge import judge_accuracy, load_judge
    from diffspeed.models.loading import load_model
    from diffspeed.models.reference import WEIGHTS_DIR

    if not (WEIGHTS_DIR / "reference-image").is_dir() or not (WEIGHTS_DIR / "judge-image").is_dir():
        pytest.skip("reference weights not shipped")
    loaded = load_model("reference-image")
    labels, seeds = [0, 2, 4, 6, 8, 10], [3000 + i for i in range(6)]
    full = generate(loaded, labels, seeds, num_steps=15, guidance_scale=4.0)
    with diffspeed.apply(loaded.transformer, TokenMergeConfig(ratio=0.3)) as h:
        out = generate(loaded, labels, seeds, num_steps=15, guidance_scale=4.0)
    value = psnr(out, full)
    print(f"token_merge 0.3: PSNR {value:.2f} dB, stats {h.stats}")
    assert h.stats["merge_ratio_effective"] == pytest.approx(76 / 256)
    assert math.isfinite(value) and value >= REFERENCE_FLOOR_DB
    judge = load_judge("judge-image")
    acc_full, acc = judge_accuracy(judge, full, labels), judge_accuracy(judge, out, labels)
    assert acc >= acc_full - 1.0 / len(labels) - 1e-6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ratio=1.0), "ratio must be in \\[0, 1\\)"),
        (dict(ratio=-0.1), "ratio must be in"),
        (dict(ratio=float("nan")), "ratio must be in"),
        (dict(stride=0), "stride must be an integer >= 1"),
        (dict(stride=(2, 2, 2)), "stride must be"),
        (dict(stride=1), "use stride >= 2"),
        (dict(merge_attn=False, merge_mlp=False), "set one of them to true"),
        (dict(merge_attn=1), "merge_attn must be true or false"),
        (dict(reuse_steps=0), "reuse_steps must be an integer >= 1"),
        (dict(min_tokens=0), "min_tokens must be an integer >= 1"),
    ],
)
def test_bad_config_values(kwargs, match):
    with pytest.raises(DiffspeedError, match=match):
        TokenMergeConfig(**kwargs)


def test_stride_pair_and_json():
    assert TokenMergeConfig(stride=(2, 1)).stride_pair == (2, 1)
    from diffspeed.methods import config_from_dict

    cfg = config_from_dict({"method": "token_merge", "ratio": 0.3, "stride": [2, 2]})
    assert cfg == TokenMergeConfig(ratio=0.3, stride=(2, 2))


@pytest.mark.parametrize("model_name, cls", [("tiny-flux", "FluxTransformer2DModel"),
                                             ("tiny-cogvideox", "CogVideoXTransformer3DModel")])
def test_unsupported_models_name_the_class(model_name, cls):
    from diffspeed.models.loading import load_model

    loaded = load_model(model_name)
    with pytest.raises(DiffspeedError, match=cls):
        token_grid(loaded.transformer, (1, 4, 8, 8))
    with pytest.raises(DiffspeedError, match=cls):
        diffspeed.apply(loaded.transformer, TokenMergeConfig())


def test_token_grid_image_and_video(tiny_dit):
    from diffspeed.models.loading import load_model

    assert token_grid(tiny_dit.transformer, (2, 4, 8, 8)) == (1, 4, 4)
    wan = load_model("tiny-wan")
    assert token_grid(wan.transformer, (2, 4, 3, 8, 8)) == (3, 4, 4)
    with pytest.raises(DiffspeedError, match="5-D video latent"):
        token_grid(wan.transformer, (2, 4, 8, 8))
