"""Context parallelism (diffusers' enable_parallelism) over a 2-process gloo group on the CPU.

Ulysses runs on CPU (gloo all-to-all); ring cannot (diffusers' native SDPA backend returns no
log-sum-exp), so it is checked to be refused up front. As in test_distributed, every multi-process
check runs in one spawned group; each rank writes its findings to a file, and the parent asserts.
"""

from __future__ import annotations

import pytest
import torch

from diffspeed.context_parallel import (
    METHOD_COMPATIBILITY, check_methods_compatible, enable_context_parallel, supported_model_classes,
)
from diffspeed.errors import DiffspeedError

from dist_helpers import expect_error as _expect_error
from dist_helpers import rank_group, spawn_group

WORLD = 2
JOIN_TIMEOUT_S = 150  # a safety net only: the group runs in ~15 s


def _worker(rank: int, world: int, port: int, outdir: str) -> None:
    import torch.distributed as dist

    with rank_group(rank, world, port, outdir) as res:
        import diffspeed
        from diffspeed.methods import BlockCacheConfig
        from diffspeed.models.loading import load_model
        from diffspeed.sampler import generate

        cpu = torch.device("cpu")
        t = torch.full((2,), 500.0)

        def predict(loaded, shape=None):
            x = torch.randn(2, *(shape or loaded.latent_shape), generator=torch.Generator().manual_seed(0))
            cond = loaded.make_condition([0, 1], cpu)
            with torch.no_grad():
                return loaded.adapter.predict(loaded.transformer, x, t, cond.cond)

        # 1. Ulysses on Flux: one forward and a whole generation == single process (float rounding)
        flux = load_model("tiny-flux")
        ref_out = predict(flux)
        ref_img = generate(flux, [0, 1], [3, 4], num_steps=3)
        # ring on CPU: refused on every rank before diffusers is called
        res["ring_error"] = _expect_error(enable_context_parallel, flux.transformer, ring_degree=2)
        handle = enable_context_parallel(flux.transformer, ulysses_degree=2)
        out = predict(flux)
        img = generate(flux, [0, 1], [3, 4], num_steps=3)
        res["ulysses_out_diff"] = float((out - ref_out).abs().max())
        res["ulysses_img_diff"] = float((img - ref_img).abs().max())
        # a token count (3) that 2 ranks cannot split: refused on every rank before any collective
        res["seq_error"] = _expect_error(predict, flux, (4, 6, 2))
        res["twice_error"] = _expect_error(enable_context_parallel, flux.transformer, ulysses_degree=2)
        handle.remove()
        res["removed_equal"] = torch.equal(predict(flux), ref_out)

        # 2. Wan (its plan splits at blocks.0 and shards the rotary tables)
        wan = load_model("tiny-wan")
        ref_w = predict(wan)
        with enable_context_parallel(wan.transformer, ulysses_degree=2):
            res["wan_out_diff"] = float((predict(wan) - ref_w).abs().max())

        # 3. an exact method that is compatible: feed-forward slicing on the local shard
        from diffspeed.methods import SlicingConfig

        sliced = diffspeed.apply(flux.transformer, SlicingConfig(chunk_tokens=2, attention_query_chunk=2))
        with enable_context_parallel(flux.transformer, ulysses_degree=2):
            res["slicing_diff"] = float((predict(flux) - ref_out).abs().max())
        res["slicing_stats"] = dict(sliced.stats)
        sliced.remove()

        # 4. bad input on one rank only: an incompatible method applied on rank 1 -> both ranks raise
        h = diffspeed.apply(flux.transformer, BlockCacheConfig()) if rank == 1 else None
        res["one_rank_error"] = _expect_error(enable_context_parallel, flux.transformer, ulysses_degree=2)
        if h is not None:
            h.remove()
        # degrees that do not match the world, a model class without a plan: every rank
        res["degree_error"] = _expect_error(enable_context_parallel, flux.transformer, ulysses_degree=4)
        res["no_plan_error"] = _expect_error(enable_context_parallel, load_model("tiny-dit").transformer,
                                             ulysses_degree=2)
        # still usable after all the refusals
        with enable_context_parallel(flux.transformer, ulysses_degree=2):
            res["after_errors_diff"] = float((predict(flux) - ref_out).abs().max())
        dist.barrier()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_group(_worker, lambda attempt: str(tmp_path_factory.mktemp(f"cp{attempt}")), WORLD, JOIN_TIMEOUT_S)


def test_ulysses_matches_single_process(results):
    for res in results:
        assert res["ulysses_out_diff"] < 1e-5
        assert res["ulysses_img_diff"] < 1e-4
        assert res["wan_out_diff"] < 1e-5
        assert res["after_errors_diff"] < 1e-5
        assert res["slicing_diff"] < 1e-5 and res["slicing_stats"]["ff_calls_sliced"] > 0
        assert res["removed_equal"]  # remove() gives back the single-process model, bit for bit


def test_ring_refused_on_cpu(results):
    for res in results:
        assert "log-sum-exp" in res["ring_error"] and "'native'" in res["ring_error"]


def test_errors_on_every_rank(results):
    for res in results:
        assert "divisible by 2" in res["seq_error"] and "3 tokens" in res["seq_error"]
        assert "already enabled" in res["twice_error"]
        assert "must equal the world size 2" in res["degree_error"]
        assert "DiTTransformer2DModel has no context-parallel plan" in res["no_plan_error"]
        assert "FluxTransformer2DModel" in res["no_plan_error"]
    assert "block_cache" in results[1]["one_rank_error"]
    assert "failed on rank(s) [1]" in results[0]["one_rank_error"]


def test_no_process_group():
    from diffspeed.models.loading import load_model

    with pytest.raises(DiffspeedError, match="init_process_group"):
        enable_context_parallel(load_model("tiny-flux").transformer, ulysses_degree=2)


def test_compatibility_matrix():
    from diffspeed.methods import BlockCacheConfig, StepCacheConfig, TokenMergeConfig
    from diffspeed.methods.base import method_names
    from diffspeed.recipe import Recipe

    from diffspeed.methods.base import _HANDLERS

    # diffspeed's own methods (other tests register throwaway methods in the same registry)
    ours = {cls.method for cls in _HANDLERS if cls.__module__.startswith("diffspeed.")}
    assert ours and ours <= set(method_names())
    assert ours <= set(METHOD_COMPATIBILITY), f"every method needs an entry in the matrix: {ours - set(METHOD_COMPATIBILITY)}"
    check_methods_compatible(["slicing", "compile"])
    with pytest.raises(DiffspeedError, match="step_cache.*token_merge"):
        check_methods_compatible(Recipe((StepCacheConfig(), TokenMergeConfig())))
    with pytest.raises(DiffspeedError, match="hang"):
        check_methods_compatible([BlockCacheConfig()])
    with pytest.raises(DiffspeedError, match="not in diffspeed's context-parallel compatibility matrix"):
        check_methods_compatible(["some_future_method"])
    classes = supported_model_classes()
    assert {"FluxTransformer2DModel", "WanTransformer3DModel"} <= set(classes)
    assert "DiTTransformer2DModel" not in classes
