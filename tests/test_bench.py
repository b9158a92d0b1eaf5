"""diffspeed.bench.runner / plots and benchmarks/dense_baseline.py (CPU, fast)."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from diffspeed.errors import DiffspeedError
from diffspeed.hooks import wrap_forward
from diffspeed.methods import base as mbase
from diffspeed.methods.base import MethodConfig, MethodHandle, Stage, register_method
from diffspeed.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
SEEDS = [0, 1]


# ---- a tiny model and test-only methods ---------------------------------------------------------


def _tiny_loaded():
    try:
        from diffspeed.models.zoo import build_model
    except ImportError:  # stand-in until the zoo exists
        build_model = None
    if build_model is not None:
        return build_model("tiny-dit", seed=0)
    from diffusers import DiTTransformer2DModel

    from diffspeed.adapters import get_adapter
    from diffspeed.models.bundle import Conditioning, LoadedModel

    torch.manual_seed(0)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                              num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()

    def make_condition(labels, device):
        y = torch.tensor(list(labels), dtype=torch.long, device=device)
        return Conditioning(cond={"class_labels": y}, uncond={"class_labels": torch.full_like(y, 10)})

    return LoadedModel(name="tiny-dit", transformer=m, adapter=get_adapter(m), latent_shape=(4, 8, 8),
                       make_condition=make_condition, class_names=[str(i) for i in range(10)])


@pytest.fixture
def loaded():
    return _tiny_loaded()


@dataclass(frozen=True)
class PerturbConfig(MethodConfig):
    """Test only: scales the first block's output (reversible, via wrap_forward)."""

    method: ClassVar[str] = "test_bench_perturb"
    stage: ClassVar[Stage] = Stage.BLOCK
    scale: float = 0.05


@dataclass(frozen=True)
class LeakyConfig(MethodConfig):
    """Test only: claims to be reversible but leaves a weight changed."""

    method: ClassVar[str] = "test_bench_leaky"
    stage: ClassVar[Stage] = Stage.WEIGHTS


@dataclass(frozen=True)
class ScaleInPlaceConfig(MethodConfig):
    """Test only: rewrites a weight in place (cannot be removed)."""

    method: ClassVar[str] = "test_bench_scale_"
    stage: ClassVar[Stage] = Stage.WEIGHTS
    in_place: ClassVar[bool] = True


@dataclass(frozen=True)
class NanConfig(MethodConfig):
    """Test only: makes the output non-finite (the sampler refuses it)."""

    method: ClassVar[str] = "test_bench_nan"
    stage: ClassVar[Stage] = Stage.BLOCK


def _first_block(model, adapter):
    return adapter.blocks(model)[0][1]


def _perturb(model, config, adapter):
    handle = MethodHandle(model, config)
    calls = {"perturbed_calls": 0}

    def wrapper(inner, *args, **kwargs):
        calls["perturbed_calls"] += 1
        return inner(*args, **kwargs) * (1 + config.scale)

    handle.on_remove(wrap_forward(_first_block(model, adapter), wrapper).remove)
    handle.stats = calls
    return handle


def _leaky(model, config, adapter):
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)
    return MethodHandle(model, config)


def _scale_in_place(model, config, adapter):
    with torch.no_grad():
        next(model.parameters()).mul_(1.1)
    handle = MethodHandle(model, config)
    handle.stats = {"weights_rewritten": 1}
    return handle


def _nan(model, config, adapter):
    handle = MethodHandle(model, config)
    handle.on_remove(wrap_forward(_first_block(model, adapter), lambda inner, *a, **k: inner(*a, **k) * float("nan")).remove)
    return handle


@pytest.fixture(autouse=True)
def _test_methods():
    pairs = [(PerturbConfig, _perturb), (LeakyConfig, _leaky), (ScaleInPlaceConfig, _scale_in_place), (NanConfig, _nan)]
    for cfg, fn in pairs:
        register_method(cfg)(fn)
    yield
    for cfg, _ in pairs:
        mbase._HANDLERS.pop(cfg, None)
        mbase._CONFIGS.pop(cfg.method, None)


def _bench(loaded, recipes, **kw):
    from diffspeed.bench.runner import run_bench

    kw.setdefault("num_steps", STEPS)
    kw.setdefault("warmup", 1)
    kw.setdefault("repeats", 2)
    kw.setdefault("progress", False)
    return run_bench(loaded, recipes, seeds=SEEDS, **kw)


# ---- run_bench ---------------------------------------------------------------------------------


def test_full_model_only(loaded):
    from diffspeed.bench.runner import REQUIRED_FIELDS

    rows = _bench(loaded, [Recipe()])
    assert len(rows) == 1
    row = rows[0]
    for key in REQUIRED_FIELDS:
        assert key in row, key
    assert row["recipe"] == "full" and row["model"] == loaded.name
    assert row["speedup"] == 1.0
    assert row["identical"] is True and row["psnr_db"] is None and row["ssim"] == 1.0
    assert row["steps"] == STEPS and row["batch"] == len(SEEDS)
    assert row["latency_ms"] > 0 and len(row["latency_all_ms"]) == 2
    assert row["flops_per_step"] > 0
    assert row["device"] == "cpu" and row["dtype"] == "float32"
    assert row["peak_mem_mb"] is None  # CPU: not measured
    assert row["stats"] == {} and row["restored"] is True
    assert json.loads(row["recipe_json"])["methods"] == []


def test_perturbed_recipe_baseline_first_and_restored(loaded):
    before = [p.detach().clone() for p in loaded.transformer.parameters()]
    rows = _bench(loaded, [Recipe((PerturbConfig(),), name="perturbed")], guidance_scale=3.0)
    assert [r["recipe"] for r in rows] == ["full", "perturbed"]  # full model prepended
    full, pert = rows
    assert full["speedup"] == 1.0
    assert pert["speedup"] == pytest.approx(full["latency_ms"] / pert["latency_ms"])
    assert pert["identical"] is False
    assert math.isfinite(pert["psnr_db"]) and pert["psnr_db"] > 0
    assert 0 < pert["ssim"] < 1 and pert["rel_error"] > 0
    # 4 steps, batched CFG: one call of the first block per step
    assert pert["stats"] == {"test_bench_perturb": {"perturbed_calls": (1 + 2) * STEPS}}
    assert pert["restored"] is True and pert["error"] is None
    assert pert["forward_batch"] == 2 * len(SEEDS) and pert["guidance_scale"] == 3.0
    assert Recipe.from_json(pert["recipe_json"]).label == "perturbed"
    assert all(torch.equal(a, b) for a, b in zip(before, loaded.transformer.parameters()))
    assert mbase.applied_methods(loaded.transformer) == {}


def test_flops_per_step_counts_both_cfg_branches(loaded):
    one = _bench(loaded, [Recipe()], guidance_scale=1.0, repeats=1, warmup=0)[0]["flops_per_step"]
    two = _bench(loaded, [Recipe()], guidance_scale=3.0, repeats=1, warmup=0)[0]["flops_per_step"]
    assert two == pytest.approx(2 * one)


def test_leaky_method_fails_the_restoration_check(loaded):
    from diffspeed.bench.runner import RestorationError

    with pytest.raises(RestorationError, match="test_bench_leaky"):
        _bench(loaded, [Recipe(), Recipe((LeakyConfig(),))], repeats=1, warmup=0)


def test_in_place_recipe_runs_on_a_copy(loaded):
    before = [p.detach().clone() for p in loaded.transformer.parameters()]
    rows = _bench(loaded, [Recipe((ScaleInPlaceConfig(),))], repeats=1, warmup=0)
    row = rows[1]
    assert row["in_place"] is True and row["restored"] is True and row["error"] is None
    assert row["identical"] is False and math.isfinite(row["psnr_db"])
    assert row["stats"] == {"test_bench_scale_": {"weights_rewritten": 1}}
    assert all(torch.equal(a, b) for a, b in zip(before, loaded.transformer.parameters()))
    assert mbase.applied_methods(loaded.transformer) == {}


def test_failing_recipe_gives_an_error_row(loaded):
    rows = _bench(loaded, [Recipe((NanConfig(),)), Recipe((PerturbConfig(),))], repeats=1, warmup=0)
    assert [r["recipe"] for r in rows] == ["full", "test_bench_nan", "test_bench_perturb"]
    err = rows[1]
    assert "NonFiniteOutputError" in err["error"] and err["latency_ms"] is None and err["restored"] is True
    assert rows[2]["error"] is None and rows[2]["restored"] is True


def test_judge_missing_is_skipped_with_a_note(loaded):
    loaded.judge = "judge-that-does-not-exist"
    rows = _bench(loaded, [Recipe()], repeats=1, warmup=0)
    assert rows[0]["judge_accuracy"] is None
    assert any("judge" in n and "unavailable" in n for n in rows[0]["notes"])


def test_judge_accuracy_reported(loaded, monkeypatch):
    import diffspeed.models.judge as judge_mod

    seen = {}

    def fake_accuracy(judge, pixels, labels):
        seen["shape"], seen["labels"] = tuple(pixels.shape), list(labels)
        return 0.5

    monkeypatch.setattr(judge_mod, "load_judge", lambda name, **kw: object())
    monkeypatch.setattr(judge_mod, "judge_accuracy", fake_accuracy)
    loaded.judge = "judge-image"
    rows = _bench(loaded, [Recipe(), Recipe((PerturbConfig(),))], repeats=1, warmup=0, labels=[3, 4])
    assert [r["judge_accuracy"] for r in rows] == [0.5, 0.5]
    assert seen["labels"] == [3, 4] and seen["shape"][0] == 2
    assert _bench(loaded, [Recipe()], repeats=1, warmup=0, with_judge=False)[0]["judge_accuracy"] is None


def test_bad_arguments(loaded):
    from diffspeed.bench.runner import run_bench

    with pytest.raises(DiffspeedError, match="labels"):
        run_bench(loaded, [Recipe()], seeds=[0, 1], labels=[0], num_steps=2, progress=False)
    with pytest.raises(DiffspeedError, match="seed"):
        run_bench(loaded, [Recipe()], seeds=[], num_steps=2, progress=False)


# ---- output ------------------------------------------------------------------------------------


def test_write_json_print_table_and_plot(loaded, tmp_path):
    from rich.console import Console

    from diffspeed.bench.plots import pareto_plot
    from diffspeed.bench.runner import print_table, write_json

    rows = _bench(loaded, [Recipe((PerturbConfig(),))], repeats=1, warmup=0)
    rows[1]["stats"]["test_bench_perturb"]["odd"] = float("inf")
    out = write_json(rows, tmp_path / "new" / "dir" / "bench.json")
    text = out.read_text()
    data = json.loads(text)
    assert "Infinity" not in text and "NaN" not in text
    assert data[0]["psnr_db"] is None and data[0]["identical"] is True
    assert data[1]["stats"]["test_bench_perturb"]["odd"] is None
    assert data[1]["psnr_db"] == pytest.approx(rows[1]["psnr_db"])
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # no temp file left

    buf = io.StringIO()
    print_table(rows, console=Console(file=buf, width=200))
    table = buf.getvalue()
    assert "full" in table and "test_bench_perturb" in table and "inf" in table

    png = pareto_plot(rows, tmp_path / "plots" / "pareto.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_json_unwritable_path_raises(tmp_path):
    from diffspeed.bench.runner import write_json

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(DiffspeedError, match="a_file"):
        write_json([{"x": 1}], blocker / "out.json")
    with pytest.raises(DiffspeedError, match="directory"):
        write_json([{"x": 1}], tmp_path)


# ---- dense baseline smoke ------------------------------------------------------------------------


def test_dense_baseline_cpu_smoke(tmp_path):
    out = tmp_path / "dense.json"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "dense_baseline.py"), "--device", "cpu", "--model", "tiny-dit",
         "--batches", "1,2", "--out", str(out), "--target-ms", "20"],
        capture_output=True, text=True, timeout=240, env=env, cwd=str(REPO),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    fields = ("model", "batch", "dtype", "compiled", "ms_per_step", "tflops_per_step", "achieved_tflops", "mfu",
              "matmul_peak_tflops", "sdpa_backend", "device", "torch_version", "command", "variant")
    assert {(r["variant"], r["batch"]) for r in rows} == {("plain", 1), ("plain", 2), ("fused_qkv", 1), ("fused_qkv", 2)}
    for r in rows:
        for key in fields:
            assert key in r, key
        assert r["compiled"] is False and r["ms_per_step"] > 0 and r["tflops_per_step"] > 0 and r["mfu"] > 0
        assert r["rel_err_vs_eager"] is not None and r["rel_err_vs_eager"] < 1e-4
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 4 and summary["failed"] == [] and summary["dense_baseline"] == str(out)
