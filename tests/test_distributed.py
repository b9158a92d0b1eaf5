"""Batch splitting and CFG-parallel over 2- and 4-process gloo groups (CPU).

Starting processes and importing torch/diffusers is the cost, so every multi-process check runs in
one spawned group (``_worker``); each rank writes its findings to a file, and the parent asserts.
"""

from __future__ import annotations

import os

import pytest
import torch

from diffspeed.distributed import generate_distributed, sample_cfg_parallel, shard_bounds
from diffspeed.errors import DiffspeedError

from dist_helpers import expect_error as _expect_error
from dist_helpers import rank_group, spawn_group

WORLD = 2
JOIN_TIMEOUT_S = 150  # a safety net only: the group itself runs in ~10-20 s


def _worker(rank: int, world: int, port: int, outdir: str) -> None:
    with rank_group(rank, world, port, outdir) as res:
        import diffspeed
        from diffspeed.methods import StepCacheConfig
        from diffspeed.models.loading import load_model
        from diffspeed.sampler import generate, sample

        loaded = load_model("tiny-dit")  # fp32, same seeded weights on every rank
        model = loaded.transformer
        labels, seeds = [0, 1, 2, 3], [10, 11, 12, 13]

        # 1. batch split == single process, bit for bit
        full = generate_distributed(loaded, labels, seeds, num_steps=3, guidance_scale=2.0)
        every = generate_distributed(loaded, labels, seeds, num_steps=3, guidance_scale=2.0, all_ranks=True)
        ref = generate(loaded, labels, seeds, num_steps=3, guidance_scale=2.0)
        res["batch_none_off_rank0"] = full is None
        if full is not None:
            res["batch_equal"] = torch.equal(full, ref)
        res["batch_all_ranks_equal"] = torch.equal(every, ref)

        # 2. a request that the world size does not divide: error on every rank, no collective
        res["split_error"] = _expect_error(generate_distributed, loaded, [0, 1, 2], [1, 2, 3], num_steps=3)
        # ranks given different seeds: detected with one collective, error on every rank
        res["disagree_error"] = _expect_error(generate_distributed, loaded, [0, 1], [rank, 5], num_steps=3)

        # 3. CFG-parallel == single-process separate CFG
        cond = loaded.make_condition(labels, torch.device("cpu"))
        common = dict(seeds=seeds, latent_shape=loaded.latent_shape, adapter=loaded.adapter)
        out = sample_cfg_parallel(model, cond, num_steps=3, guidance_scale=3.0, **common)
        ref = sample(model, cond, num_steps=3, guidance_scale=3.0, cfg_mode="separate", **common)
        res["cfg_equal"] = torch.equal(out, ref)
        res["cfg_max_diff"] = float((out - ref).abs().max())

        # 4. CFG-parallel with a step cache on each rank == separate CFG with the cache
        cfg = StepCacheConfig(threshold=50.0, max_consecutive=2, warmup_steps=1, final_steps=1)
        with diffspeed.apply(model, cfg) as h:
            out = sample_cfg_parallel(model, cond, num_steps=6, guidance_scale=3.0, **common)
            res["cache_stats"] = dict(h.stats)
            res["cache_branches"] = sorted(diffspeed.get_context(model).branch_states(f"step_cache@{id(h)}"))
        with diffspeed.apply(model, cfg) as h:
            ref = sample(model, cond, num_steps=6, guidance_scale=3.0, cfg_mode="separate", **common)
            res["cache_ref_stats"] = dict(h.stats)
        res["cache_equal"] = torch.equal(out, ref)
        res["cache_max_diff"] = float((out - ref).abs().max())

        # 5. CFG-parallel argument errors: on every rank, before any collective
        res["guidance_error"] = _expect_error(sample_cfg_parallel, model, cond, num_steps=3, guidance_scale=1.0, **common)
        no_uncond = type(cond)(cond.cond, None)
        res["uncond_error"] = _expect_error(sample_cfg_parallel, model, no_uncond, num_steps=3, guidance_scale=2.0, **common)

        # the group is still usable after the errors
        after = generate_distributed(loaded, [0, 1], [10, 11], num_steps=2, all_ranks=True)
        res["after_errors_ok"] = after is not None and after.shape[0] == 2


def _worker4(rank: int, world: int, port: int, outdir: str) -> None:
    """Four ranks: batch split (with a step cache on every rank) == one process, and a split error."""
    with rank_group(rank, world, port, outdir) as res:
        import diffspeed
        from diffspeed.methods import StepCacheConfig
        from diffspeed.models.loading import load_model
        from diffspeed.sampler import generate

        loaded = load_model("tiny-dit")
        labels, seeds = [0, 1, 2, 3, 4, 5, 6, 7], list(range(20, 28))
        every = generate_distributed(loaded, labels, seeds, num_steps=3, guidance_scale=2.0, all_ranks=True)
        ref = generate(loaded, labels, seeds, num_steps=3, guidance_scale=2.0)
        res["batch_equal"] = torch.equal(every, ref)
        # each rank's cache decides on its own shard: equal to the cache run on that shard in one process
        cfg = StepCacheConfig(threshold=50.0, max_consecutive=2, warmup_steps=1, final_steps=1)
        with diffspeed.apply(loaded.transformer, cfg) as h:
            cached = generate_distributed(loaded, labels, seeds, num_steps=6, guidance_scale=2.0, all_ranks=True)
            res["cache_skipped"] = h.stats["skipped_steps"]
        lo, hi = shard_bounds(len(seeds), world, rank)
        with diffspeed.apply(loaded.transformer, cfg):
            mine = generate(loaded, labels[lo:hi], seeds[lo:hi], num_steps=6, guidance_scale=2.0)
        res["cache_shard_equal"] = torch.equal(cached[lo:hi], mine)
        res["split_error"] = _expect_error(generate_distributed, loaded, labels[:6], seeds[:6], num_steps=2)


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    return spawn_group(_worker, lambda attempt: str(tmp_path_factory.mktemp(f"dist{attempt}")), WORLD, JOIN_TIMEOUT_S)


def test_batch_split_equals_single_process_bitwise(group_results):
    r0, r1 = group_results
    assert r0["batch_equal"] is True
    assert r0["batch_none_off_rank0"] is False and r1["batch_none_off_rank0"] is True
    assert r0["batch_all_ranks_equal"] and r1["batch_all_ranks_equal"]
    assert r0["after_errors_ok"] and r1["after_errors_ok"]


def test_uneven_split_and_disagreement_raise_on_every_rank(group_results):
    for res in group_results:
        assert res["split_error"] is not None and "3 seeds cannot be split evenly over 2 ranks" in res["split_error"]
        assert res["disagree_error"] is not None and "ranks disagree" in res["disagree_error"]


def test_cfg_parallel_equals_separate_cfg(group_results):
    # bit-identical: each rank runs exactly the forward that sample(cfg_mode="separate") runs for its
    # branch (same inputs, batch and thread count), gloo's all_gather copies the bits, and the
    # guidance combination and Euler update are the same expressions in the same order
    for res in group_results:
        assert res["cfg_equal"] is True, res["cfg_max_diff"]


def test_cfg_parallel_with_step_cache_keeps_branch_state_on_its_rank(group_results):
    r0, r1 = group_results
    assert r0["cache_equal"] is True and r1["cache_equal"] is True, (r0["cache_max_diff"], r1["cache_max_diff"])
    assert r0["cache_branches"] == ["cond"] and r1["cache_branches"] == ["uncond"]
    # the cache really skipped on both ranks, and the two ranks together did what one process did
    assert r0["cache_stats"]["skipped_steps"] > 0 and r1["cache_stats"]["skipped_steps"] > 0
    ref = r0["cache_ref_stats"]
    for key in ("skipped_steps", "computed_steps", "skipped_blocks"):
        assert r0["cache_stats"][key] + r1["cache_stats"][key] == ref[key]


def test_cfg_parallel_errors_on_every_rank(group_results):
    for res in group_results:
        assert res["guidance_error"] is not None and "CFG-parallel needs guidance > 1" in res["guidance_error"]
        assert res["uncond_error"] is not None and "uncond" in res["uncond_error"]


def test_no_process_group_is_a_clear_error(tiny_dit):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(DiffspeedError, match="init_process_group"):
        generate_distributed(tiny_dit, [0, 1], [0, 1], num_steps=2)
    cond = tiny_dit.make_condition([0], torch.device("cpu"))
    with pytest.raises(DiffspeedError, match="init_process_group"):
        sample_cfg_parallel(tiny_dit.transformer, cond, seeds=[0], num_steps=2, guidance_scale=2.0)


def test_four_ranks_batch_split_and_cache_per_shard(tmp_path):
    def outdir(attempt: int) -> str:
        os.makedirs(tmp_path / f"w4_{attempt}")
        return str(tmp_path / f"w4_{attempt}")

    for res in spawn_group(_worker4, outdir, 4, JOIN_TIMEOUT_S):
        assert res["batch_equal"] is True
        assert res["cache_shard_equal"] is True and res["cache_skipped"] > 0
        assert res["split_error"] is not None and "6 seeds cannot be split evenly over 4 ranks" in res["split_error"]


def test_shard_bounds():
    assert [shard_bounds(6, 3, r) for r in range(3)] == [(0, 2), (2, 4), (4, 6)]
    assert shard_bounds(4, 1, 0) == (0, 4)
    with pytest.raises(DiffspeedError, match="cannot be split evenly"):
        shard_bounds(5, 2, 0)
    with pytest.raises(DiffspeedError, match="at least one seed"):
        shard_bounds(0, 2, 0)
