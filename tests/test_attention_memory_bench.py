"""CPU smoke of benchmarks/attention.py and benchmarks/memory.py: rows with all fields are written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_target_grid_and_resample():
    import torch

    att = _load("attention")
    assert att.target_grid(4096, (16, 8, 8)) == (16, 16, 16)
    assert att.target_grid(32768, (16, 8, 8)) == (32, 32, 32)
    assert att.target_grid(256, (16, 8, 8)) == (4, 8, 8)
    x = torch.randn(2, 1024, 4)
    y, g = att.resample(x, (16, 8, 8), 4096)
    assert y.shape == (2, 4096, 4) and g == (16, 16, 16)


def test_attention_smoke(tmp_path, capsys):
    att = _load("attention")
    out = tmp_path / "att.json"
    rc = att.main(["--device", "cpu", "--seq-lens", "256", "--head-dims", "64", "--heads", "2",
                   "--block-size", "64", "--settings", "0:0:0,0.05:1:64", "--capture-steps", "2",
                   "--repeats", "1", "--warmup", "0", "--out", str(out), "--plot", str(tmp_path / "p.png")])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert {r["input"] for r in rows} == {"structured-upsampled", "random"}
    assert {r["method"] for r in rows} == {"dense", "flex"}
    for r in rows:
        for key in ("seq_len", "head_dim", "method", "settings", "speedup", "rel_error", "density", "input",
                    "device", "ms"):
            assert key in r and r[key] is not None, key
    exact = [r for r in rows if r["method"] == "flex" and r["settings"]["threshold"] == 0]
    assert all(r["rel_error"] < 1e-4 for r in exact)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["failed"] == [] and summary["rows"] == len(rows)


def test_memory_smoke(tmp_path, capsys):
    mem = _load("memory")
    out = tmp_path / "mem.json"
    rc = mem.main(["--device", "cpu", "--models", "tiny-wan", "--chunks", "16:16", "--sdpa", "default",
                   "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert {r["mode"] for r in rows} == {"forward", "generate-2step"}
    for r in rows:
        for key in ("model", "settings", "peak_mem_mb", "baseline_peak_mem_mb", "max_rel_error", "latency_ms",
                    "device", "sdpa_backend"):
            assert key in r, key
        assert r["status"] == "ok"
        assert r["max_rel_error"] is not None and r["max_rel_error"] < 1e-4
    sliced = [r for r in rows if r["settings"] != "baseline"]
    assert sliced and all(r["stats"]["ff_calls_sliced"] > 0 for r in sliced)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["failed"] == []
