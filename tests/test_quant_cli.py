"""The quantization commands: calibrate activations / compensation, quantize, plan-bits, sweep."""

import json

import pytest
import torch

from test_cli import run_cli

MODEL = "reference-image"


def ok(code, err):
    assert code in (0, None), err


def test_help_of_new_commands(monkeypatch, capsys):
    for cmd in (["quantize"], ["plan-bits"], ["sweep"], ["calibrate", "activations"], ["calibrate", "compensation"]):
        code, out, _ = run_cli(monkeypatch, capsys, *cmd, "--help")
        assert code == 0 and "Usage" in out


def test_static_ptq_compensation_pipeline(monkeypatch, capsys, tmp_path):
    stats, qdir = tmp_path / "stats.safetensors", tmp_path / "q8"
    table, recipe, png = tmp_path / "table.json", tmp_path / "recipe.json", tmp_path / "g.png"
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", "activations", "--model", MODEL, "--seeds", "2",
                           "--steps", "3", "--groups", "3", "--out", str(stats))
    ok(code, err)
    assert stats.is_file() and "timestep groups" in err
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--model", MODEL, "--format", "int8_w8a8", "--act", "static",
                           "--calibration", str(stats), "--smooth-alpha", "0.5", "--out", str(qdir))
    ok(code, err)
    assert (qdir / "ptq.safetensors").is_file() and (qdir / "ptq_config.json").is_file()
    assert "layers quantized" in err and "torch._int_mm" in err and "MiB ->" in err
    meta = json.loads((qdir / "ptq_config.json").read_text())
    assert meta["config"]["act"] == "static" and all(v["act"] == "static" for v in meta["layers"].values())

    code, _, err = run_cli(monkeypatch, capsys, "calibrate", "compensation", "--model", MODEL, "--quantized", str(qdir),
                           "--seeds", "2", "--steps", "3", "--out", str(table), "--recipe-out", str(recipe))
    ok(code, err)
    from diffspeed.quant.compensation import CompensationTable

    tab = CompensationTable.load(table)
    assert tab.num_steps == 3 and tab.latent_channels == 3 and not tab.is_identity()
    methods = [m["method"] for m in json.loads(recipe.read_text())["methods"]]
    assert methods == ["ptq_", "error_compensation"]

    code, _, err = run_cli(monkeypatch, capsys, "generate", "--model", MODEL, "-n", "2", "--steps", "3",
                           "--recipe", str(recipe), "--out", str(png))
    ok(code, err)
    assert png.is_file() and "steps_corrected" in err
    # the table is refused for another step count, with the fix named
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--model", MODEL, "-n", "1", "--steps", "4",
                           "--recipe", str(recipe), "--out", str(tmp_path / "g4.png"))
    assert code == 2 and "calibrated for 3 steps" in err and not (tmp_path / "g4.png").exists()


def test_plan_bits_then_quantize_plan_round_trips(monkeypatch, capsys, tmp_path):
    from diffspeed.methods.ptq import load_ptq_
    from diffspeed.models.loading import load_model
    from diffspeed.quant.mixed_precision import MixedPrecisionPlan, apply_plan_

    plan_path, qdir = tmp_path / "plan.json", tmp_path / "qp"
    code, _, err = run_cli(monkeypatch, capsys, "plan-bits", "--model", MODEL, "--formats", "int8_w8a8",
                           "--budget-fraction", "0.8", "--seeds", "2", "--steps", "3", "--keep-steps", "2",
                           "--out", str(plan_path))
    ok(code, err)
    plan = MixedPrecisionPlan.load(plan_path)
    float_bytes = plan.budget["float_bytes"]
    assert plan.predicted_bytes <= 0.8 * float_bytes
    assert 0 < len(plan.quantized_layers) < len(plan.formats)
    assert "int8_w8a8" in err and "predicted size" in err

    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--model", MODEL, "--plan", str(plan_path), "--out", str(qdir))
    ok(code, err)
    assert f"{len(plan.quantized_layers)} layers quantized" in err
    meta = json.loads((qdir / "ptq_config.json").read_text())
    assert "mixed_precision_plan" in meta and set(meta["layers"]) == set(plan.quantized_layers)

    # the saved checkpoint restores exactly the plan-applied model
    ref = load_model(MODEL)
    apply_plan_(ref.transformer, plan)
    restored = load_model(MODEL)
    load_ptq_(restored.transformer, qdir)
    assert sum(p.numel() * p.element_size() for p in restored.transformer.buffers()) > 0
    from diffspeed.sampler import generate

    a = generate(ref, [0, 1], [0, 1], num_steps=2, guidance_scale=4.0)
    b = generate(restored, [0, 1], [0, 1], num_steps=2, guidance_scale=4.0)
    assert torch.equal(a, b)


def test_sweep_local_writes_rows(monkeypatch, capsys, tmp_path):
    r1 = tmp_path / "r1.json"
    r1.write_text(json.dumps({"methods": [{"method": "step_cache", "threshold": 0.1}]}))
    out = tmp_path / "sweep.json"
    code, _, err = run_cli(monkeypatch, capsys, "sweep", "--models", MODEL, "--recipes", str(r1), "--seeds", "0,1",
                           "--steps", "3", "--repeats", "1", "--warmup", "0", "--no-judge", "--backend", "local",
                           "--json", str(out))
    ok(code, err)
    rows = json.loads(out.read_text())
    assert [(r["recipe"], r["seeds"]) for r in rows] == [("full", [0]), ("step_cache", [0]), ("full", [1]),
                                                         ("step_cache", [1])]
    assert all(r["error"] is None and r["latency_ms"] > 0 for r in rows)


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00garbage, not safetensors")
    (tmp_path / "corrupt_plan.json").write_text("{not json")
    (tmp_path / "plan.json").write_text(json.dumps({"format": "diffspeed-mixed-precision/1", "formats": {"x.y": "int3"}}))
    (tmp_path / "bad_recipe.json").write_text("{not json")
    broken = tmp_path / "broken_q"
    broken.mkdir()
    (broken / "ptq_config.json").write_text("{}")
    (broken / "ptq.safetensors").write_bytes(b"truncated")
    return tmp_path


@pytest.mark.parametrize(
    "args, message",
    [
        (["calibrate", "activations", "--model", "no-such-model", "--out", "s.safetensors"], "no-such-model"),
        (["calibrate", "activations", "--out", "s.txt"], "must end with .safetensors"),
        (["calibrate", "activations", "--steps", "3", "--groups", "5", "--out", "s.safetensors"], "--groups (5) must be <="),
        (["quantize", "--format", "int3", "--out", "q"], "unknown --format 'int3'"),
        (["quantize", "--act", "static", "--out", "q"], "need(s) --calibration"),
        (["quantize", "--act", "static", "--calibration", "corrupt.safetensors", "--out", "q"], "not a readable safetensors"),
        (["quantize", "--act", "static", "--calibration", "missing.safetensors", "--out", "q"], "no calibration stats file"),
        (["quantize", "--plan", "corrupt_plan.json", "--out", "q"], "cannot read mixed-precision plan"),
        (["quantize", "--plan", "plan.json", "--out", "q"], "unknown format 'int3'"),
        (["quantize", "--plan", "plan.json", "--format", "int8_w8a8", "--out", "q"], "drop --format"),
        (["quantize", "--model", "no-such-model", "--out", "q"], "no-such-model"),
        (["calibrate", "compensation", "--quantized", "nowhere", "--out", "t.json"], "not a ptq_ checkpoint"),
        (["calibrate", "compensation", "--quantized", "broken_q", "--steps", "2", "--seeds", "1", "--out", "t.json"],
         "broken_q"),
        (["plan-bits", "--out", "p.json"], "exactly one budget"),
        (["plan-bits", "--budget-mb", "3", "--budget-fraction", "0.4", "--out", "p.json"], "exactly one budget"),
        (["plan-bits", "--formats", "int3", "--budget-mb", "3", "--out", "p.json"], "unknown format 'int3'"),
        (["plan-bits", "--formats", "int8_w8a8", "--budget-mb", "1", "--out", "p.json"], "is unreachable"),
        (["sweep", "--models", "no-such-model", "--json", "s.json"], "unknown model 'no-such-model'"),
        (["sweep", "--models", MODEL, "--backend", "dask", "--json", "s.json"], "--backend must be local or ray"),
        (["sweep", "--models", MODEL, "--recipes", "bad_recipe.json", "--json", "s.json"], "not valid JSON"),
        (["sweep", "--models", MODEL, "--seeds", "0,x", "--json", "s.json"], "--seeds must be"),
    ],
)
def test_bad_input_exit_2_writes_nothing(monkeypatch, capsys, bad_files, args, message):
    monkeypatch.chdir(bad_files)
    before = sorted(p.relative_to(bad_files) for p in bad_files.rglob("*"))
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.relative_to(bad_files) for p in bad_files.rglob("*")) == before


def test_smooth_alpha_auto_picks_the_best_measured(monkeypatch, capsys, tmp_path):
    stats = tmp_path / "stats.safetensors"
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", "activations", "--model", MODEL, "--seeds", "2",
                           "--steps", "3", "--groups", "3", "--out", str(stats))
    ok(code, err)
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--model", MODEL, "--act", "static", "--calibration",
                             str(stats), "--smooth-alpha", "auto", "--search-steps", "2", "--search-seeds", "2",
                             "--out", str(tmp_path / "q"))
    ok(code, err)
    assert "SmoothQuant alpha search" in err
    saved = json.loads((tmp_path / "q" / "ptq_config.json").read_text())
    assert saved["config"]["smooth_alpha"] in (None, 0.3, 0.5, 0.65, 0.8)
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--model", MODEL, "--calibration", str(stats),
                           "--smooth-alpha", "lots", "--out", str(tmp_path / "q2"))
    assert code == 2 and "--smooth-alpha must be a number" in err and not (tmp_path / "q2").exists()


def test_search_smooth_alpha_returns_the_argmax(tmp_path):
    from diffspeed.methods.ptq import PTQConfig
    from diffspeed.models.loading import load_model
    from diffspeed.quant.alpha_search import search_smooth_alpha
    from diffspeed.quant.calibration import calibrate

    loaded = load_model(MODEL)
    stats = calibrate(loaded, seeds=[1, 2], labels=[0, 1], steps=3, guidance=4.0, num_groups=3, progress=False)
    path = str(tmp_path / "stats.safetensors")
    stats.save(path)
    before = [p.clone() for p in loaded.transformer.parameters()]
    best, scores = search_smooth_alpha(loaded, PTQConfig(format="int8_w8a8", act="static", calibration=path),
                                       stats=stats, alphas=(0.5, 0.8), seeds=(5, 6), steps=2)
    assert set(scores) == {"none", "0.5", "0.8"}
    assert scores["none" if best is None else str(best)] == max(scores.values())
    assert all(torch.equal(a, b) for a, b in zip(before, loaded.transformer.parameters()))  # model left unchanged


def test_quantize_gptq_writes_a_checkpoint_that_loads(monkeypatch, capsys, tmp_path):
    qdir = tmp_path / "g4"
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--model", MODEL, "--format", "int4_weight_only",
                           "--group-size", "32", "--gptq", "--gptq-seeds", "2", "--gptq-steps", "3", "--out", str(qdir))
    ok(code, err)
    meta = json.loads((qdir / "ptq_config.json").read_text())
    assert meta["config"]["gptq"] is True and meta["layers"]
    from diffspeed.methods.ptq import load_ptq_
    from method_tester import load_tiny

    fresh = load_tiny(MODEL)
    assert load_ptq_(fresh.transformer, qdir).quantized
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--model", MODEL, "--format", "fp8_w8a8", "--gptq",
                           "--out", str(tmp_path / "bad"))
    assert code == 2 and "fp8" in err and not (tmp_path / "bad").exists()
