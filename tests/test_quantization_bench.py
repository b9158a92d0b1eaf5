"""CPU smoke test of benchmarks/quantization.py: rows have the issue's schema, a real low-bit kernel
is detected for int8_w8a8 and not for the float baseline, compensation and mixed rows are written."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str = "quantization"):
    """Import ``benchmarks/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


needs_weights = pytest.mark.skipif(not (ROOT / "src/diffspeed/weights/reference-image").exists(),
                                   reason="reference weights missing")


@needs_weights
def test_quantization_bench_cpu_smoke(tmp_path):
    out = tmp_path / "q.json"
    mod = _load()
    rc = mod.main(["--device", "cpu", "--stages", "fidelity", "--samples", "2", "--steps", "2", "--calib-seeds", "2",
                   "--groups", "2", "--configs", "int8_w8a8 dynamic,torchao int8_dynamic,comp", "--repeats", "1",
                   "--out", str(out), "--plot", str(tmp_path / "q.png")])
    assert rc == 0
    rows = json.loads(out.read_text())
    required = {"model", "device", "batch", "config", "peer", "compiled", "low_precision_kernel", "speedup",
                "weight_mb", "peak_mem_mb", "psnr_db", "judge_accuracy"}
    for row in rows:
        assert required <= set(row), required - set(row)
    by = {r["config"]: r for r in rows}
    assert by["float"]["low_precision_kernel"] is False
    ours = by["ptq int8_w8a8 dynamic"]
    assert ours["error"] is None and ours["low_precision_kernel"] is True and not ours["peer"]
    assert "aten::_int_mm" in ours["low_precision_ops"]
    assert math.isfinite(ours["psnr_db"]) and ours["psnr_db"] > 25
    assert ours["weight_mb"] < by["float"]["weight_mb"]
    assert by["torchao int8_dynamic"]["peer"] is True
    comp = [r for r in rows if r["config"].endswith("+comp")]
    assert comp and comp[0]["error"] is None and "overhead_pct" in comp[0]
    assert (tmp_path / "q.png").exists()


@needs_weights
def test_compensation_bench_cpu_smoke(tmp_path):
    mod = _load("compensation")
    out = tmp_path / "c.json"
    assert mod.main(["--settings", "int4-row:2", "--gptq", "int4-g32:3", "--calib", "2", "--eval", "2",
                     "--out", str(out)]) == 0
    gptq, row = json.loads(out.read_text())
    assert gptq["method"] == "gptq" and gptq["layers_quantized"] > 0
    assert gptq["psnr_db_compensated"] != gptq["psnr_db_plain"]  # GPTQ really changed the rounding
    assert row["steps_corrected"] > 0
    assert math.isfinite(row["psnr_db_plain"]) and math.isfinite(row["psnr_db_compensated"])
    assert row["psnr_db_plain"] < 60  # the 4-bit rounding really changed the output
    assert row["psnr_db_compensated"] != row["psnr_db_plain"]  # the correction really changed it too


@needs_weights
def test_smooth_alpha_bench_cpu_smoke(tmp_path):
    mod = _load("smooth_alpha")
    out = tmp_path / "a.json"
    assert mod.main(["--steps", "2", "--calib", "2", "--eval", "2", "--groups", "2", "--acts", "static", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {r["alpha"] for r in rows} == {None, 0.3, 0.5, 0.65, 0.8}
    assert sum(r["chosen"] for r in rows) == 1 and all(math.isfinite(r["psnr_db"]) for r in rows)
    (chosen,) = [r for r in rows if r["chosen"]]
    assert chosen["psnr_db"] == max(r["psnr_db"] for r in rows)
    assert len({round(r["psnr_db"], 6) for r in rows}) > 1  # smoothing changes the quantized output


def test_config_selection_by_substring_or_exact_name():
    picked = _load().picked
    assert picked("ptq int4_weight_only g32 all linears", ["g32"])
    assert not picked("ptq int4_weight_only g32 all linears", ["=ptq int4_weight_only g32"])
    assert picked("ptq int4_weight_only g32", ["=ptq int4_weight_only g32"])
    assert not picked("ptq int8_w8a8 dynamic", ["fp8", "=int8"])
