"""ERTACache schedule rules at equal reuse: residual-change threshold vs measured reuse cost (fidelity only).

Why: a step cache's speed is set by how many steps it reuses, its quality by *which* ones. This
script calibrates ``erta_cache`` on the reference image model with the threshold rule over a sweep,
then with ``reuse_steps=K`` (:mod:`diffspeed.erta_schedule`) at the same K values, and measures the
final outputs of other seeds against the full model (PSNR / SSIM). Reuse counts are equal by
construction, so the transformer work skipped is the same: the comparison is fidelity at equal
work, which does not depend on the device (fp32). Timings are not taken here (see ``caching.py``).

    python benchmarks/erta_schedule.py --steps 25 --out benchmarks/results/erta_schedule_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="reference-image")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--calib-seeds", type=int, default=4)
    p.add_argument("--eval-seeds", type=int, default=8)
    p.add_argument("--thresholds", default="0.15,0.2,0.25,0.3,0.35")
    p.add_argument("--extra-k", default="", help="more reuse counts for the reuse-cost rule, e.g. 17")
    p.add_argument("--configs", default="", help="JSON list of calibrate_erta keyword sets measured as rule 'custom' "
                   "(e.g. guidance reuse: [{\"threshold\": 0.3, \"guidance_threshold\": 0.1}]); then no sweep")
    p.add_argument("--append", action="store_true", help="add the rows to --out instead of replacing it")
    p.add_argument("--out", default="benchmarks/results/erta_schedule_cpu.json")
    args = p.parse_args(argv)

    from diffspeed.bench.metrics import psnr, ssim
    from diffspeed.calibrate import _IN_MEMORY, calibrate_erta
    from diffspeed.errors import DiffspeedError
    from diffspeed.methods.erta_cache import ErtaCacheConfig, apply_with_data
    from diffspeed.models.loading import load_model
    from diffspeed.sampler import generate as generate_images

    torch.set_grad_enabled(False)
    loaded = load_model(args.model)
    model, adapter = loaded.transformer, loaded.adapter
    k = loaded.num_classes or 1
    calib_seeds = [10_000 + i for i in range(args.calib_seeds)]
    calib_labels = [i % k for i in range(args.calib_seeds)]
    eval_seeds = list(range(args.eval_seeds))
    eval_labels = [i % k for i in eval_seeds]

    def generate() -> torch.Tensor:  # what benchmarks/caching.py compares: the sampler's images, batched CFG
        return generate_images(loaded, eval_labels, eval_seeds, num_steps=args.steps, guidance_scale=args.guidance,
                               cfg_mode="batched")

    full = generate()
    rows: list[dict[str, Any]] = json.loads(Path(args.out).read_text()) if args.append and Path(args.out).is_file() else []

    def measure(rule: str, setting: Any, data: dict[str, Any], seconds: float) -> None:
        handle = apply_with_data(model, ErtaCacheConfig(calibration=_IN_MEMORY), adapter, data)
        try:
            out = generate()
        finally:
            handle.remove()
        reused = [i for i, s in enumerate(data["schedule"]) if s]
        halves = [i for i, g in enumerate(data.get("guidance_reuse") or ()) if g]  # half the block work skipped
        row = {"model": args.model, "device": "cpu", "dtype": "float32", "steps": args.steps, "rule": rule,
               "setting": setting, "reuse_steps": len(reused), "reused": reused, "guidance_reused": halves,
               "skipped_fraction": (len(reused) + 0.5 * len(halves)) / args.steps,
               "psnr_db": psnr(out, full), "ssim": ssim(out, full),
               "kept_correction": (data["stats"].get("validation") or {}).get("kept"),
               "calibration_s": round(seconds, 1), "calib_seeds": calib_seeds, "eval_seeds": eval_seeds,
               "guidance_scale": args.guidance}
        rows.append(row)
        print(f"{rule:10s} {str(setting):6s} K={row['reuse_steps']:2d} half={len(halves)} psnr {row['psnr_db']:.2f} dB "
              f"ssim {row['ssim']:.4f} kept {row['kept_correction']} reused {reused} ({seconds:.0f} s)", flush=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))

    if args.configs:
        for kwargs in json.loads(args.configs):
            t0 = time.perf_counter()
            data = calibrate_erta(loaded, num_steps=args.steps, seeds=calib_seeds, labels=calib_labels,
                                  guidance_scale=args.guidance, **kwargs)
            measure("custom", kwargs, data, time.perf_counter() - t0)
        return 0
    ks: list[int] = []
    for t in [float(x) for x in args.thresholds.split(",") if x]:
        t0 = time.perf_counter()
        data = calibrate_erta(loaded, num_steps=args.steps, seeds=calib_seeds, labels=calib_labels,
                              guidance_scale=args.guidance, threshold=t)
        measure("threshold", t, data, time.perf_counter() - t0)
        ks.append(sum(data["schedule"]))
    ks += [int(x) for x in args.extra_k.split(",") if x]
    for kk in sorted(set(x for x in ks if x > 0)):
        t0 = time.perf_counter()
        try:
            data = calibrate_erta(loaded, num_steps=args.steps, seeds=calib_seeds, labels=calib_labels,
                                  guidance_scale=args.guidance, reuse_steps=kk)
        except DiffspeedError as exc:
            print(f"reuse_cost K={kk}: {exc}", flush=True)
            continue
        measure("reuse_cost", kk, data, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
