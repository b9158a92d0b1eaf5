"""`diffspeed generate` / `bench` under torchrun (2 CPU ranks, gloo): the samples are split over the ranks
and the output equals the single-process output bit for bit; bench rows are gathered on rank 0."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], nproc: int, tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_port()}", "-m", "diffspeed.cli", *args] if nproc > 1 else \
          [sys.executable, "-m", "diffspeed.cli", *args]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=240)


def test_generate_and_bench_under_torchrun(tmp_path):
    gen = ["generate", "--model", "tiny-dit", "-n", "4", "--steps", "2", "--guidance", "2"]
    one = _run([*gen, "--out", str(tmp_path / "one.png")], 1, tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run([*gen, "--out", str(tmp_path / "two.png")], 2, tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    a = np.asarray(Image.open(tmp_path / "one.png"))
    b = np.asarray(Image.open(tmp_path / "two.png"))
    assert a.shape == b.shape and np.array_equal(a, b)

    bench = ["bench", "--model", "tiny-dit", "-n", "2", "--steps", "2", "--repeats", "1", "--warmup", "0",
             "--json", str(tmp_path / "rows.json")]
    res = _run(bench, 2, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert sorted({r["rank"] for r in rows}) == [0, 1] and all(r["world_size"] == 2 for r in rows)
    assert sorted(s for r in rows for s in r["seeds"]) == [0, 1]

    bad = _run(["bench", "--model", "tiny-dit", "-n", "3", "--steps", "2", "--repeats", "1"], 2, tmp_path)
    assert bad.returncode != 0 and "cannot be split evenly over 2 ranks" in bad.stderr
