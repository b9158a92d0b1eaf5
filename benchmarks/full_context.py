#!/usr/bin/env python
"""Fidelity of MotionCache and region-adaptive sampling on ``reference-video`` with and without
full-context attention on partial steps (CPU; fidelity and work skipped only, no speed).

Without ``full_context`` the recomputed tokens of a partial step attend only to each other; with it
they attend to the keys / values of every token. Same seeds, labels and CFG for every row; PSNR of
the final clips vs the full model's. Writes a JSON list of rows.

    python benchmarks/full_context.py --out benchmarks/results/full_context_cpu.json
"""

from __future__ import annotations

import argparse
import sys


import diffspeed
from diffspeed.bench.metrics import psnr
from diffspeed.bench.runner import write_json
from diffspeed.bench.script import command_meta
from diffspeed.methods.motion_cache import MotionCacheConfig
from diffspeed.methods.region_adaptive import RegionAdaptiveConfig
from diffspeed.models.loading import load_model
from diffspeed.sampler import generate

CASES = (  # (method, steps, settings without full_context)
    ("motion_cache", 50, {}),  # the defaults
    ("motion_cache", 50, {"recompute_ratio": 0.5, "warmup_steps": 3}),  # the defaults before the fix
    ("region_adaptive", 25, {}),  # the defaults (ratio 0.5)
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", default="0,4")
    p.add_argument("--seeds", default="2000,2001")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every case's steps (smoke runs)")
    p.add_argument("--out", default="benchmarks/results/full_context_cpu.json")
    args = p.parse_args(argv)
    labels = [int(v) for v in args.labels.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    loaded = load_model("reference-video")
    configs = {"motion_cache": MotionCacheConfig, "region_adaptive": RegionAdaptiveConfig}
    rows, fulls = [], {}
    for method, steps, settings in CASES:
        steps = max(2, round(steps * args.steps_scale))
        kw = dict(num_steps=steps, guidance_scale=args.guidance)
        if steps not in fulls:
            fulls[steps] = generate(loaded, labels, seeds, **kw)
        for full_context in (False, True):
            cfg = configs[method](**settings, full_context=full_context)
            with diffspeed.apply(loaded.transformer, cfg) as handle:
                out = generate(loaded, labels, seeds, **kw)
                stats = dict(handle.stats)
            row = {"model": "reference-video", "device": "cpu", "method": method, "steps": steps,
                   "settings": {**settings, "full_context": full_context}, "psnr_db": psnr(out, fulls[steps]),
                   "skipped_fraction": stats["skipped_fraction"], "labels": labels, "seeds": seeds,
                   "guidance": args.guidance}
            rows.append(row)
            print(f"{method} {steps} steps {row['settings']}: {row['psnr_db']:.2f} dB, "
                  f"{row['skipped_fraction']:.1%} token-blocks reused", flush=True)
    rows[0]["meta"] = command_meta("benchmarks/full_context.py", argv)
    write_json(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
