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
    assert {r["input"] for r in rows} == {"structured-upsampled", "structured-noisy", "random"}
    assert {r["method"] for r in rows} == {"dense", "flex"}
    for r in rows:
        for key in ("seq_len", "head_dim", "method", "settings", "speedup", "rel_error", "density", "input",
                    "device", "ms"):
            assert key in r and r[key] is not None, key
    exact = [r for r in rows if r["method"] == "flex" and r["settings"]["threshold"] == 0]
    assert all(r["rel_error"] < 1e-4 for r in exact)
    # --compensate both (default): every threshold > 0 setting also runs compensated, right after its plain row
    for inp in ("structured-upsampled", "structured-noisy", "random"):
        flex = [r for r in rows if r["method"] == "flex" and r["input"] == inp]
        assert [(r["settings"]["threshold"], r["settings"]["compensate"]) for r in flex] == [
            (0.0, False), (0.05, False), (0.05, True)]
    notes = {r["input"]: r["notes"] for r in rows}
    assert "smooth within a block" in notes["structured-upsampled"] and notes["random"] is None
    assert "not smooth" in notes["structured-noisy"]
    noisy = next(r for r in rows if r["input"] == "structured-noisy")
    assert noisy["noise"]["k_noise_std"] > 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["failed"] == [] and summary["rows"] == len(rows)


def test_attention_settings_parsing(tmp_path, capsys):
    """--compensate off keeps the old rows; a 4th settings field turns compensation on for that item."""
    att = _load("attention")
    out = tmp_path / "att.json"
    rc = att.main(["--device", "cpu", "--seq-lens", "256", "--head-dims", "64", "--heads", "1",
                   "--block-size", "64", "--settings", "0.05:0:0,0.1:0:0:c", "--compensate", "off",
                   "--inputs", "random", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert rc == 0
    flex = [r for r in json.loads(out.read_text()) if r["method"] == "flex"]
    assert [(r["settings"]["threshold"], r["settings"]["compensate"]) for r in flex] == [(0.05, False), (0.1, True)]
    with pytest.raises(SystemExit):
        att.main(["--device", "cpu", "--settings", "0.05:0", "--out", str(out)])


def test_memory_smoke(tmp_path, capsys):
    mem = _load("memory")
    out = tmp_path / "mem.json"
    rc = mem.main(["--device", "cpu", "--models", "tiny-wan", "--chunks", "16:16,16:16:plain", "--sdpa", "default",
                   "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert {r["mode"] for r in rows} == {"forward", "generate-2step"}
    for r in rows:
        for key in ("model", "settings", "peak_mem_mb", "baseline_peak_mem_mb", "max_rel_error", "latency_ms",
                    "device", "sdpa_backend", "resident_mb", "activation_peak_mb", "baseline_activation_peak_mb",
                    "activation_reduction", "total_reduction", "wan_grouping"):
            assert key in r, key
        assert r["status"] == "ok"
        assert r["max_rel_error"] is not None and r["max_rel_error"] < 1e-4
        assert r["activation_peak_mb"] is None  # CUDA-only measurements
    sliced = [r for r in rows if r["settings"] != "baseline"]
    assert sliced and all(r["stats"]["ff_calls_sliced"] > 0 for r in sliced)
    grouped = [r for r in sliced if r["wan_grouping"]]
    plain = [r for r in sliced if r["wan_grouping"] is False]
    assert grouped and all(r["stats"]["attn_calls_grouped"] > 0 for r in grouped)
    assert plain and all(r["stats"]["attn_calls_grouped"] == 0 and "plain" in r["settings"] for r in plain)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["failed"] == []


def test_memory_resolutions_parse():
    mem = _load("memory")
    assert mem.parse_resolution("720x1280") == (90, 160)
    assert mem.parse_resolution("480X832") == (60, 104)
    for bad in ("720", "720x1281", "0x64", "axb"):
        with pytest.raises(SystemExit, match="--resolutions"):
            mem.parse_resolution(bad)
