#!/usr/bin/env python
"""SmoothQuant alpha vs fidelity on ``reference-image`` (int8 W8A8, CPU; fidelity only).

Activation stats from ``--calib`` calibration seeds; then :func:`diffspeed.quant.alpha_search.
search_smooth_alpha` on ``--eval`` other seeds for static and dynamic activation scales. Writes a JSON
list of rows (``act``, ``alpha`` or null, ``psnr_db`` vs the unquantized output).

    python benchmarks/smooth_alpha.py --out benchmarks/results/smooth_alpha_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


from diffspeed.bench.runner import write_json
from diffspeed.bench.script import command_meta
from diffspeed.methods.ptq import PTQConfig
from diffspeed.models.loading import load_model
from diffspeed.quant.alpha_search import search_smooth_alpha
from diffspeed.quant.calibration import calibrate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--calib", type=int, default=8)
    p.add_argument("--eval", type=int, default=8)
    p.add_argument("--groups", type=int, default=5)
    p.add_argument("--acts", default="static,dynamic")
    p.add_argument("--out", default="benchmarks/results/smooth_alpha_cpu.json")
    args = p.parse_args(argv)
    loaded = load_model("reference-image")
    n_cls = len(loaded.class_names)
    stats = calibrate(loaded, seeds=list(range(5000, 5000 + args.calib)), labels=[i % n_cls for i in range(args.calib)],
                      steps=args.steps, guidance=args.guidance, num_groups=args.groups, progress=False)
    path = str(Path(tempfile.mkdtemp()) / "stats.safetensors")
    stats.save(path)
    rows = []
    for act in args.acts.split(","):
        best, scores = search_smooth_alpha(loaded, PTQConfig(format="int8_w8a8", act=act, calibration=path), stats=stats,
                                           seeds=list(range(1000, 1000 + args.eval)), steps=args.steps,
                                           guidance=args.guidance)
        for key, value in scores.items():
            rows.append({"model": "reference-image", "device": "cpu", "format": "int8_w8a8", "act": act,
                         "alpha": None if key == "none" else float(key), "psnr_db": value,
                         "chosen": (None if key == "none" else float(key)) == best, "steps": args.steps,
                         "calib_seeds": args.calib, "eval_seeds": args.eval})
        print(f"{act}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()) + f" -> {best}", flush=True)
    rows[0]["meta"] = command_meta("benchmarks/smooth_alpha.py", argv)
    write_json(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
