import json
import sys

import pytest

from diffspeed import cli


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["diffspeed", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--model", "no-such-model"], "no-such-model"),
        (["generate", "--model", "tiny-dit", "--steps", "0"], "--steps must be a positive"),
        (["generate", "--model", "tiny-dit", "--steps", "-3"], "--steps must be a positive"),
        (["generate", "--model", "tiny-dit", "--guidance", "-1"], "--guidance must be >= 0"),
        (["generate", "--model", "tiny-dit", "--out", "/proc/nope/x.png"], "/proc/nope"),
        (["generate", "--model", "tiny-dit", "--out", "out.txt"], "must end with"),
        (["bench", "--model", "tiny-dit", "--repeats", "0"], "--repeats must be positive"),
    ],
)
def test_bad_input_one_line(monkeypatch, capsys, tmp_path, args, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.png"))


def test_bad_recipe_files(monkeypatch, capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"methods": [{"method": "warp_drive"}]}))
    out_png = tmp_path / "x.png"
    for path, msg in ((bad, "not valid JSON"), (unknown, "unknown method 'warp_drive'")):
        code, _, err = run_cli(monkeypatch, capsys, "generate", "--model", "tiny-dit", "--recipe", str(path), "--out", str(out_png))
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1
    assert not out_png.exists()


def test_generate_and_bench_write_outputs(monkeypatch, capsys, tmp_path):
    png = tmp_path / "g.png"
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--model", "tiny-dit", "-n", "2", "--steps", "2", "--out", str(png))
    assert code in (0, None) and png.exists()
    gif = tmp_path / "v.gif"
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--model", "tiny-wan", "-n", "1", "--steps", "2", "--guidance", "1", "--out", str(gif))
    assert code in (0, None) and gif.exists()
    js = tmp_path / "b.json"
    code, _, err = run_cli(monkeypatch, capsys, "bench", "--model", "tiny-dit", "-n", "1", "--steps", "2", "--repeats", "1", "--json", str(js))
    assert code in (0, None), err
    rows = json.loads(js.read_text())
    for key in ("model", "recipe", "steps", "latency_ms", "speedup", "psnr_db", "ssim", "peak_mem_mb", "device"):
        assert key in rows[0]


def test_help_for_each_command(monkeypatch, capsys):
    for cmd in ("generate", "bench", "demo", "methods"):
        code, out, _ = run_cli(monkeypatch, capsys, cmd, "--help")
        assert code == 0 and "Usage" in out


def test_demo_writes_grid_and_table(monkeypatch, capsys, tmp_path):
    png, js = tmp_path / "demo.png", tmp_path / "demo.json"
    code, out, err = run_cli(monkeypatch, capsys, "demo", "--steps", "6", "--num", "2", "--out", str(png), "--json", str(js))
    assert code in (0, None), err
    rows = json.loads(js.read_text())
    assert png.exists() and [r["recipe"] for r in rows][0] == "full"
    fast = rows[1]
    assert fast["speedup"] > 0 and fast["psnr_db"] is not None and fast["stats"]["step_cache"]["skipped_steps"] > 0
