"""CPU smoke of benchmarks/tokens.py: rows for every token method on the reference models, JSON schema."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = {"token_merge", "region_adaptive", "sparse_attention"}
ROW_KEYS = ("model", "method", "is_method", "settings", "speedup", "psnr_db", "ssim", "judge_accuracy",
            "full_judge_accuracy", "device", "batch", "steps", "work_skipped_fraction", "work_measure",
            "linear_rows_skipped_fraction", "method_stats", "latency_ms", "restored", "error", "notes")


def _load():
    spec = importlib.util.spec_from_file_location("bench_tokens", REPO / "benchmarks" / "tokens.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_tokens_smoke(tmp_path, capsys):
    tok = _load()
    out = tmp_path / "tokens.json"
    png = tmp_path / "tokens.png"
    # 2 steps keep it short; region_adaptive's 2 warm-up steps are then both full (it skips nothing yet)
    rc = tok.main(["--device", "cpu", "--steps", "2", "--batches", "1", "--quick", "--threads", "2",
                   "--out", str(out), "--plot", str(png)])
    assert rc == 0
    data = json.loads(out.read_text())
    meta, rows = data["meta"], data["rows"]
    for key in ("device", "torch", "diffusers", "command", "truncated"):
        assert key in meta, key
    assert meta["device"] == "cpu" and meta["truncated"] is False
    assert "benchmarks/tokens.py" in meta["command"]

    assert {r["model"] for r in rows} == {"reference-video", "reference-image"}
    for r in rows:
        for key in ROW_KEYS:
            assert key in r, key
        assert r["error"] is None, r["error"]
        assert r["device"] == "cpu" and r["batch"] == 1 and r["steps"] == 2
        for key in ("speedup", "ssim", "latency_ms", "work_skipped_fraction"):
            assert _finite(r[key]), (r["method"], key, r[key])
        assert r["identical"] or _finite(r["psnr_db"])
        assert _finite(r["judge_accuracy"]) and _finite(r["full_judge_accuracy"])
        assert 0.0 <= r["work_skipped_fraction"] <= 1.0

    full = [r for r in rows if r["method"] == "full"]
    methods = [r for r in rows if r["method"] != "full"]
    assert len(full) == 2
    assert all(r["is_method"] is False and r["identical"] and r["speedup"] == 1.0 for r in full)
    assert all(r["is_method"] is True for r in methods)
    for model in ("reference-video", "reference-image"):
        f = next(r for r in full if r["model"] == model)
        sub = [r for r in methods if r["model"] == model]
        assert {r["method"] for r in sub} == METHODS, model
        for r in sub:
            assert r["restored"] is True
            assert r["full_judge_accuracy"] == f["judge_accuracy"]
            assert r["work_measure"] and r["method_stats"]
            # the work really skipped/merged, as counted by each method's handle
            if r["method"] == "region_adaptive":
                assert r["method_stats"]["full_steps"] > 0 and "skipped_fraction" in r["method_stats"]
            else:
                assert r["work_skipped_fraction"] > 0, (model, r["method"], r["method_stats"])
        tm = next(r for r in sub if r["method"] == "token_merge")
        assert tm["linear_rows_skipped_fraction"] > 0.3  # merged tokens do not reach the linears

    assert png.is_file() and png.stat().st_size > 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == len(rows) and summary["method_rows"] == len(methods) == 6
    assert summary["errors"] == 0 and summary["not_restored"] == 0 and summary["truncated"] is False


def test_tokens_budget_truncates(tmp_path, capsys):
    tok = _load()
    out = tmp_path / "tokens.json"
    rc = tok.main(["--device", "cpu", "--steps", "2", "--batches", "1", "--quick", "--budget-s", "0",
                   "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["meta"]["truncated"] is True and data["rows"] == []
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["truncated"] is True


def test_sweeps_and_batches():
    tok = _load()
    args = tok.parse_args(["--batches", "1,fill", "--fill-video", "8"])
    assert tok.batches_for(args, True) == [1, 8] and tok.batches_for(args, False) == [1, args.fill_image]
    tm = tok.sweep("token_merge", steps=25, n_tokens=1024, quick=False, on_cuda=True, sparse_backend=None)
    assert len({s["ratio"] for s in tm}) >= 3
    sp = tok.sweep("sparse_attention", steps=25, n_tokens=1024, quick=False, on_cuda=False, sparse_backend=None)
    assert {s["backend"] for s in sp} == {"reference"} and {s["block_size"] for s in sp} == {64}
    assert any(s.get("local_window") for s in sp) and len({s["threshold"] for s in sp}) >= 4
    sp_img = tok.sweep("sparse_attention", steps=25, n_tokens=256, quick=False, on_cuda=False, sparse_backend=None)
    assert all(s["min_tokens"] == 256 for s in sp_img)
    if tok._flex_ok():  # on CUDA the flex kernel needs 128-token blocks
        gpu = tok.sweep("sparse_attention", steps=25, n_tokens=1024, quick=False, on_cuda=True, sparse_backend=None)
        assert {(s["backend"], s["block_size"]) for s in gpu} == {("flex", 128)}
    ra = tok.sweep("region_adaptive", steps=25, n_tokens=1024, quick=False, on_cuda=True, sparse_backend=None)
    assert len({s["recompute_ratio"] for s in ra}) >= 3


def test_full_context_bench_cpu_smoke(tmp_path):
    """benchmarks/full_context.py writes one row per case and setting; the switch really changes the output."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_full_context", root / "benchmarks" / "full_context.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "fc.json"
    assert mod.main(["--labels", "0", "--seeds", "5", "--steps-scale", "0.2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 6 and {r["settings"]["full_context"] for r in rows} == {False, True}
    pairs = [(off, on) for off, on in zip(rows[::2], rows[1::2]) if off["skipped_fraction"] > 0]
    assert pairs and all(not off["settings"]["full_context"] and on["settings"]["full_context"] for off, on in pairs)
    assert any(off["psnr_db"] != on["psnr_db"] for off, on in pairs)
