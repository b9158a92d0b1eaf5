"""Peer caching methods (diffusers hooks, cache-dit) on tiny models through diffspeed's sampler.

Each peer must apply, run, really skip work at a permissive setting (measured by the leaf-linear
counters, not by the peer's word), keep generations independent, and be removed bit-exactly, or
refuse with a reason. Plus the side-by-side benchmark's CPU smoke run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers.hooks")

from diffspeed.bench.peers import (  # noqa: E402
    PEERS,
    TAYLORSEER_FIXED_IDENTIFIERS,
    PeerError,
    RunInfo,
    WorkCounter,
    peer_names,
    peer_stats,
    skipped_fraction,
)
from diffspeed.models.loading import load_model  # noqa: E402
from diffspeed.sampler import generate  # noqa: E402

try:
    import cache_dit  # noqa: F401

    HAVE_CACHE_DIT = True
except Exception:  # noqa: BLE001 - an optional extra (pip install -e ".[peers]")
    HAVE_CACHE_DIT = False

STEPS = 8
GUIDANCE = 4.0
SEEDS = [0, 1]
CALIB_SEEDS = [100, 101]

# settings at which every peer must skip something within 8 steps
PERMISSIVE = {
    "fbc": {"threshold": 0.6},
    "pab": {"spatial_attention_timestep_skip_range": [-1, 1001]},
    "fastercache": {"spatial_attention_timestep_skip_range": [-1, 1001],
                    "unconditional_batch_timestep_skip_range": [-1, 1001]},
    "taylorseer": {"cache_interval": 2, "disable_cache_before_step": 2},
    "taylorseer_lite": {"cache_interval": 2, "disable_cache_before_step": 2},
    "magcache": {"threshold": 0.5},
    "dbcache": {"residual_diff_threshold": 0.5, "max_warmup_steps": 2},
    "dbcache_taylorseer": {"residual_diff_threshold": 0.5, "max_warmup_steps": 2},
}

# (model, peer, cfg_mode) that must be refused, with a word of the reason
UNSUPPORTED = {
    ("tiny-dit", "taylorseer_lite", "batched"): "proj_out",
    ("tiny-dit", "taylorseer_lite", "separate"): "proj_out",
    ("tiny-dit", "fastercache", "separate"): "batched CFG",
    ("tiny-wan", "fastercache", "separate"): "batched CFG",
}


def _labels(loaded, n: int) -> list[int]:
    k = loaded.num_classes
    return [i % k if k else i for i in range(n)]


def _gen(loaded, cfg_mode: str, steps: int = STEPS) -> torch.Tensor:
    return generate(loaded, _labels(loaded, len(SEEDS)), SEEDS, num_steps=steps, guidance_scale=GUIDANCE,
                    cfg_mode=cfg_mode)


def _module_state(model: torch.nn.Module) -> list:
    return [(name, sorted(k for k in m.__dict__ if not k.startswith("_diffspeed")), "forward" in m.__dict__,
             list(m._modules), list(m._parameters), list(m._buffers))
            for name, m in model.named_modules()]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: load_model(name) for name in ("tiny-dit", "tiny-wan")}


def test_registry_lists_every_peer_with_settings():
    assert set(peer_names()) == set(PERMISSIVE)
    for name, peer in PEERS.items():
        assert peer.family in ("diffusers", "cache-dit"), name
        assert isinstance(peer.recommended, dict) and peer.recommended, name
        assert isinstance(peer.sweep, list) and peer.sweep, name
        assert peer.source, name
        json.dumps(peer.recommended), json.dumps(peer.sweep)


@pytest.mark.parametrize("cfg_mode", ["batched", "separate"])
@pytest.mark.parametrize("peer_name", list(PERMISSIVE))
@pytest.mark.parametrize("model_name", ["tiny-dit", "tiny-wan"])
def test_peer_skips_real_work_and_restores(models, model_name, peer_name, cfg_mode):
    loaded = models[model_name]
    transformer = loaded.transformer
    peer = PEERS[peer_name]
    if peer.family == "cache-dit" and not HAVE_CACHE_DIT:
        assert "not importable" in " ".join(peer.not_supported_reasons(transformer))
        pytest.skip("cache-dit is not installed (the 'peers' extra)")
    run = RunInfo(STEPS, cfg_mode, GUIDANCE)
    with WorkCounter(transformer) as counter:
        base = _gen(loaded, cfg_mode)
        full = counter.counts()
    assert full["attn_rows"] > 0 and full["mlp_rows"] > 0
    before = _module_state(transformer)

    expected = UNSUPPORTED.get((model_name, peer_name, cfg_mode))
    reasons = peer.not_supported_reasons(transformer, PERMISSIVE[peer_name], run)
    if expected is not None:
        assert reasons and expected in " ".join(reasons)
        with pytest.raises(PeerError, match="cannot run here"):
            peer.apply(transformer, PERMISSIVE[peer_name], run)
        assert _module_state(transformer) == before
        assert torch.equal(_gen(loaded, cfg_mode), base)
        return
    assert reasons == []

    settings = {**PERMISSIVE[peer_name], **peer.calibrate(loaded, run, _labels(loaded, 2), CALIB_SEEDS)}
    assert torch.equal(_gen(loaded, cfg_mode), base), "calibration must leave the model as it was"
    handle = peer.apply(transformer, settings, run)
    try:
        out = _gen(loaded, cfg_mode)
        work = peer_stats(handle)
        assert {k: v for k, v in work.items() if k != "reported"} == peer_stats(transformer)
        assert torch.isfinite(out).all()
        # really skipped: fewer attention rows than the full model, measured at the leaves
        assert work["attn_rows"] < full["attn_rows"], (peer_name, work, full)
        assert skipped_fraction(work, full) > 0
        assert not torch.equal(out, base), "skipping work must change the output"
        # state is reset between generations: the same seeds give the same output
        assert torch.equal(_gen(loaded, cfg_mode), out)
        # another step count works too
        assert torch.isfinite(_gen(loaded, cfg_mode, steps=STEPS + 3)).all()
    finally:
        handle()  # the handle is the remover
    assert handle.removed
    assert _module_state(transformer) == before, "removal must leave every module as it was"
    assert torch.equal(_gen(loaded, cfg_mode), base), "removal must restore bit-identical outputs"


def test_diffusers_state_is_per_cfg_branch(models):
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    loaded = models["tiny-dit"]
    head = loaded.transformer.transformer_blocks[0]
    for cfg_mode, names in (("separate", {"cond", "uncond"}), ("batched", {"batched"})):
        with PEERS["fbc"].apply(loaded.transformer, {"threshold": 0.05}, RunInfo(STEPS, cfg_mode, GUIDANCE)):
            hook = HookRegistry.check_if_exists_or_initialize(head).get_hook(_FBC_LEADER_BLOCK_HOOK)
            _gen(loaded, cfg_mode)
            assert set(hook.state_manager._state_cache) == names
            assert hook.state_manager._context is None  # set only around each call


def test_taylorseer_default_identifiers_are_a_silent_no_op_and_auto_fixes_it(models):
    loaded = models["tiny-wan"]
    run = RunInfo(STEPS, "batched", GUIDANCE)
    with pytest.raises(PeerError, match="silently do nothing"):
        PEERS["taylorseer"].apply(loaded.transformer, {"cache_identifiers": "default"}, run)
    with PEERS["taylorseer"].apply(loaded.transformer, {}, run) as handle:
        assert any("silent no-op" in n for n in handle.notes)
        assert handle.reported["cache_identifiers"] == TAYLORSEER_FIXED_IDENTIFIERS


def test_magcache_needs_calibrated_ratios(models):
    loaded = models["tiny-dit"]
    run = RunInfo(STEPS, "batched", GUIDANCE)
    with pytest.raises(PeerError, match="calibrate"):
        PEERS["magcache"].apply(loaded.transformer, {}, run)
    ratios = PEERS["magcache"].calibrate(loaded, run, [0, 1], CALIB_SEEDS)["mag_ratios"]
    assert len(ratios) == STEPS and ratios[0] == 1.0 and all(math.isfinite(r) and r > 0 for r in ratios)
    # separate CFG calls: the per-branch lists are averaged into one
    sep = PEERS["magcache"].calibrate(loaded, RunInfo(STEPS, "separate", GUIDANCE), [0, 1], CALIB_SEEDS)
    assert len(sep["mag_ratios"]) == STEPS


@pytest.mark.skipif(not HAVE_CACHE_DIT, reason="cache-dit is not installed (the 'peers' extra)")
def test_cache_dit_default_f8b0_is_refused_on_small_models(models):
    loaded = models["tiny-dit"]
    with pytest.raises(PeerError, match="Fn \\+ Bn"):
        PEERS["dbcache"].apply(loaded.transformer, {"Fn_compute_blocks": 8}, RunInfo(STEPS, "batched", GUIDANCE))


def test_never_skipping_settings_skip_nothing(models):
    loaded = models["tiny-wan"]
    run = RunInfo(STEPS, "batched", GUIDANCE)
    with WorkCounter(loaded.transformer) as counter:
        base = _gen(loaded, "batched")
        full = counter.counts()
    never = {"fbc": {"threshold": 1e-9}, "taylorseer": {"cache_interval": 1}}
    if HAVE_CACHE_DIT:
        never["dbcache"] = {"residual_diff_threshold": 1e-9, "max_warmup_steps": 1}
    for name, settings in never.items():
        with PEERS[name].apply(loaded.transformer, settings, run) as handle:
            out = _gen(loaded, "batched")
            assert skipped_fraction(handle.stats(), full) == 0.0, name
            assert torch.allclose(out, base, atol=1e-5), name


# ---- the benchmark's CPU smoke -----------------------------------------------------------------

def _load_caching_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "caching.py"
    spec = importlib.util.spec_from_file_location("caching_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_caching_benchmark_cpu_smoke(tmp_path, capsys):
    caching = _load_caching_module()
    out, plot = tmp_path / "caching.json", tmp_path / "caching.png"
    rc = caching.main(["--models", "tiny-dit,no-such-model", "--steps", "6", "--batches", "1", "--quick",
                       "--out", str(out), "--plot", str(plot)])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert plot.is_file() and plot.stat().st_size > 1000
    for row in rows:
        missing = [f for f in caching.ROW_FIELDS if f not in row]
        assert not missing, (row.get("method"), missing)
    bad = [r for r in rows if r["model"] == "no-such-model"]
    assert len(bad) == 1 and bad[0]["error"]
    main = [r for r in rows if r["model"] == "tiny-dit" and r.get("stage") != "overhead"]
    methods = {r["method"] for r in main}
    assert {"full", "step_cache", "block_cache"} <= methods
    assert set(PEERS) <= methods
    for r in main:
        assert r["peer"] == (r["method"] in PEERS)
        if r["error"]:
            continue
        assert r["restored"] is True, r
        assert r["latency_ms"] > 0 and r["speedup"] > 0
        assert r["skipped_fraction"] is not None and 0.0 <= r["skipped_fraction"] <= 1.0
        assert r["identical"] or r["psnr_db"] is not None
    full = next(r for r in main if r["method"] == "full")
    assert full["speedup"] == 1.0 and full["identical"] and full["skipped_fraction"] == 0.0
    lite = [r for r in main if r["method"] == "taylorseer_lite"]
    assert len(lite) == 1 and "proj_out" in lite[0]["error"]  # refused once, with the reason; no sweep rows
    overhead = [r for r in rows if r.get("stage") == "overhead"]
    assert any(r["method"] == "block_cache_overhead" for r in overhead)
    assert any(r["method"] == "fbc_overhead" for r in overhead)
    for r in overhead:
        if r["method"] != "full_overhead" and not r["error"]:
            assert r["overhead_pct"] is not None and r["skipped_fraction"] == 0.0, r
            assert r["noise_pct"] is not None and r["noise_pct"] >= 0 and isinstance(r["overhead_resolved"], bool), r
    text = capsys.readouterr().out
    summary = json.loads(text.strip().splitlines()[-1])
    assert summary["summary"] == "caching" and summary["configs"][0]["model"] == "tiny-dit"
    assert summary["not_restored"] == 0 and summary["partial"] is False


def test_caching_benchmark_budget_and_judge(tmp_path, capsys, monkeypatch):
    caching = _load_caching_module()
    out = tmp_path / "c.json"
    assert caching.main(["--models", "tiny-dit", "--steps", "4", "--batches", "1", "--quick", "--stages", "image",
                         "--budget-s", "0", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == []
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["partial"] is True

    # the judge path, with a stand-in judge
    import diffspeed.models.judge as judge_mod

    monkeypatch.setattr(judge_mod, "load_judge", lambda name, device=None: object())
    monkeypatch.setattr(judge_mod, "judge_accuracy", lambda judge, pixels, labels: 0.5)
    args = caching.parse_args(["--models", "tiny-dit", "--quick"])
    rows: list = []
    bench = caching.Bench(args, "tiny-dit", torch.device("cpu"), torch.float32, rows, lambda: None)
    bench.loaded.judge = "judge-image"
    bench._load_judge()
    bench.setup(4, 1)
    bench.measure(caching.Entry("full", False, "full", "full", {}))
    row = bench.measure(caching.our_entries(False, 2, True, False, ["step_cache"])[0])
    assert rows[0]["judge_accuracy"] == 0.5 and row["judge_accuracy"] == 0.5 and row["restored"]


def test_caching_benchmark_ours_grid_replaces_the_sweep():
    caching = _load_caching_module()
    ours = caching.our_entries(True, 4, False, False, ["step_cache", "erta_cache", "motion_cache"])
    grid = {"erta_cache": [{"calibration_threshold": 0.4, "calibration_max_consecutive": 4}],
            "motion_cache": [{"recompute_ratio": 0.35, "idle_steps": 1}]}
    out = caching.grid_entries(ours, grid)
    assert [e for e in out if e.method == "step_cache"] == [e for e in ours if e.method == "step_cache"]
    erta = [e for e in out if e.method == "erta_cache"]
    motion = [e for e in out if e.method == "motion_cache"]
    assert len(erta) == 1 and erta[0].settings["calibration_max_consecutive"] == 4
    assert len(motion) == 1 and motion[0].config.idle_steps == 1 and motion[0].settings["recompute_ratio"] == 0.35
    with pytest.raises(SystemExit, match="unknown method 'nope'"):
        caching.grid_entries(ours, {"nope": [{}]})


def test_caching_benchmark_peers_grid_replaces_the_sweep():
    caching = _load_caching_module()
    default = caching.peer_entries(False, False, ["magcache", "fbc"])
    out = caching.peer_entries(False, False, ["magcache", "fbc"], {"magcache": [{"max_skip_steps": 6}]})
    mag = [e for e in out if e.method == "magcache"]
    assert [e.variant for e in mag] == ["recommended", "grid"]
    assert mag[1].settings["max_skip_steps"] == 6 and mag[1].settings["threshold"] == mag[0].settings["threshold"]
    assert [e.settings for e in out if e.method == "fbc"] == [e.settings for e in default if e.method == "fbc"]
    with pytest.raises(SystemExit, match="unknown peer"):
        caching.peer_entries(False, False, None, {"nope": [{}]})
