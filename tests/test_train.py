"""Training/evaluation smoke runs on CPU (tiny models, a few steps) and loop mechanics."""

import json
import math

import pytest
import torch
from torch import nn

from diffspeed.models.judge import load_judge
from diffspeed.models.reference import load_reference
from diffspeed.train.common import EMA, TrainSettings, lr_factor, train_loop

TINY_DIT = dict(num_attention_heads=2, attention_head_dim=16, num_layers=1)
TINY_WAN = dict(num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=1, rope_max_seq_len=32)
REQUIRED_ROW_KEYS = {"model", "judge_accuracy", "frechet_judge", "frechet_real_vs_real", "steps", "guidance_scale",
                     "num_samples", "device"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny judges and tiny reference models trained for a few steps into one weights root."""
    from diffspeed.train.image import train_image
    from diffspeed.train.judge import train_judge
    from diffspeed.train.video import train_video

    root = tmp_path_factory.mktemp("w")
    logs = tmp_path_factory.mktemp("logs")
    out = {"root": root, "logs": logs}
    out["judge-image"] = train_judge("image", steps=3, batch_size=8, device="cpu", out=root, log_dir=logs,
                                     heldout=24, channels=(8, 8, 8, 8))
    out["judge-video"] = train_judge("video", steps=2, batch_size=2, device="cpu", out=root, log_dir=logs,
                                     heldout=8, channels=(4, 4, 4, 8))
    out["image"] = train_image(steps=4, batch_size=4, device="cpu", out=root, log_dir=logs, model_overrides=TINY_DIT)
    out["video"] = train_video(steps=2, batch_size=2, device="cpu", out=root, log_dir=logs, model_overrides=TINY_WAN,
                               embed_tokens=2)
    return out


def test_lr_schedule():
    assert lr_factor(0, 0.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 0.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(500, 0.5, 10, 0.1) == pytest.approx(0.55)
    assert lr_factor(1000, 1.0, 10, 0.1) == pytest.approx(0.1)


def test_ema_tracks_weights():
    lin = nn.Linear(2, 2)
    ema = EMA(lin, decay=0.5)
    with torch.no_grad():
        lin.weight.add_(1.0)
    for step in range(200):
        ema.update(lin, step + 1000)
    avg = ema.averaged_copy(lin)
    assert torch.allclose(avg.weight, lin.weight, atol=1e-5)
    assert avg is not lin


def test_time_budget_stops_early():
    lin = nn.Linear(4, 1)
    x = torch.randn(16, 4)

    def loss_fn(step):
        return lin(x).pow(2).mean()

    settings = TrainSettings(steps=10**7, batch_size=16, lr=1e-2, max_minutes=0.5 / 60, warmup_steps=5, ema_decay=None)
    result = train_loop(lin, loss_fn, settings, torch.device("cpu"), label="t", items_per_step=16)
    assert result.stopped_by == "time" and 0 < result.steps < 10**7
    assert math.isfinite(result.final_loss) and result.history


def test_judges_trained_and_saved(trained):
    for kind in ("image", "video"):
        summary = trained[f"judge-{kind}"]
        assert 0.0 <= summary["heldout_accuracy"] <= 1.0
        assert math.isfinite(summary["train"]["final_loss"])
        judge = load_judge(f"judge-{kind}", weights_dir=trained["root"])
        assert judge.config["heldout_samples"] > 0 and "heldout_accuracy" in judge.config
        assert (trained["logs"] / f"judge-{kind}-loss.png").is_file()


@pytest.mark.parametrize("name", ["image", "video"])
def test_reference_training_writes_loadable_weights(trained, name):
    from diffspeed.sampler import generate

    summary = trained[name]
    assert math.isfinite(summary["train"]["final_loss"]) and summary["train"]["steps"] > 0
    folder = trained["root"] / f"reference-{name}"
    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((folder / "training.json").read_text())["model"] == f"reference-{name}"
    assert (trained["logs"] / f"reference-{name}-loss.png").is_file()
    loaded = load_reference(f"reference-{name}", weights_dir=trained["root"])
    pix = generate(loaded, [0, 1], [0, 1], num_steps=2, guidance_scale=2.0)
    assert torch.isfinite(pix).all() and pix.shape[0] == 2


def test_evaluate_image_writes_rows_and_grid(trained, tmp_path):
    from diffspeed.train.evaluate import evaluate

    out_json, grid = tmp_path / "eval.json", tmp_path / "grid.png"
    rows = evaluate("reference-image", samples=4, steps=2, guidance=(2.0, 1.0), device="cpu",
                    weights_dir=trained["root"], out_json=out_json, grid=grid)
    assert len(rows) == 2 and grid.is_file()
    saved = json.loads(out_json.read_text())
    assert len(saved) == 2 and REQUIRED_ROW_KEYS <= set(saved[0])
    assert all(math.isfinite(r["frechet_judge"]) for r in saved)
    # re-running the same configuration replaces its row instead of appending
    evaluate("reference-image", samples=4, steps=2, guidance=(2.0,), device="cpu", weights_dir=trained["root"],
             out_json=out_json)
    assert len(json.loads(out_json.read_text())) == 2


def test_evaluate_video_writes_gif(trained, tmp_path):
    from diffspeed.train.evaluate import evaluate

    rows = evaluate("reference-video", samples=2, steps=1, guidance=(2.0,), device="cpu", weights_dir=trained["root"],
                    out_json=tmp_path / "v.json", grid=tmp_path / "v.png")
    assert (tmp_path / "v.png").is_file() and (tmp_path / "v.gif").is_file()
    assert rows[0]["motion_generated"] >= 0 and rows[0]["motion_real"] > 0


def test_cli(tmp_path):
    from typer.testing import CliRunner

    from diffspeed.train.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["judge", "--kind", "image", "--device", "cpu", "--steps", "2", "--batch-size", "4",
                              "--heldout", "12", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "judge-image" / "model.safetensors").is_file()
    res = runner.invoke(app, ["evaluate", "--model", "reference-image", "--weights-dir", str(tmp_path / "none"),
                              "--device", "cpu"])
    assert res.exit_code == 2 and "not trained" in res.output
    res = runner.invoke(app, ["image", "--steps", "0", "--device", "cpu", "--out", str(tmp_path)])
    assert res.exit_code == 2


def test_nonfinite_loss_rolls_back_instead_of_losing_the_run():
    lin = nn.Linear(4, 1)
    x = torch.randn(16, 4)

    def loss_fn(step):
        loss = lin(x).pow(2).mean()
        return loss * float("nan") if step >= 120 else loss

    settings = TrainSettings(steps=1000, batch_size=16, lr=1e-2, warmup_steps=5, log_every=50)
    ema = EMA(lin, 0.9)
    result = train_loop(lin, loss_fn, settings, torch.device("cpu"), label="nan", items_per_step=16, ema=ema)
    assert result.stopped_by == "nonfinite" and result.steps == 150
    assert all(torch.isfinite(t).all() for t in ema.shadow)
    assert torch.isfinite(ema.averaged_copy(lin).weight).all()
