"""``diffspeed demo``: the shipped reference image model, full vs accelerated, offline in < 1 minute on CPU.

Two generations with the same seeds and labels (full model, then the demo recipe), a grid PNG (full
on top, recipe below), and a bench table: latency, speedup, PSNR/SSIM vs the full output, judge
accuracy and the work the recipe really skipped. The full benchmark (repeats, restoration check,
FLOPs, memory) is ``diffspeed bench``. Falls back to a random-weight tiny DiT, with a warning, only if
the reference weights are missing from the install.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console

from .errors import WeightFileError
from .recipe import Recipe

# the accelerated recipe the demo shows: reversible, no calibration file needed
DEMO_RECIPE_JSON = {
    "name": "step_cache(0.3)",
    "methods": [{"method": "step_cache", "threshold": 0.3, "max_consecutive": 3, "warmup_steps": 2, "final_steps": 1}],
}


def demo_recipe() -> Recipe:
    return Recipe.from_dict(DEMO_RECIPE_JSON)


def _judge_accuracy(loaded, pixels: torch.Tensor, labels: list[int]) -> float | None:  # noqa: ANN001
    if not loaded.judge:
        return None
    try:
        from .models.judge import judge_accuracy, load_judge

        return float(judge_accuracy(load_judge(loaded.judge), pixels, torch.tensor(labels)))
    except (ImportError, WeightFileError):
        return None


def run_demo(out: Path, steps: int, num: int, json_path: Path | None, console: Console) -> list[dict]:
    from .bench.metrics import psnr, ssim
    from .bench.runner import print_table
    from .media import check_writable, save_image_grid
    from .models.loading import load_model
    from .recipe import apply_recipe
    from .sampler import generate

    check_writable(out, (".png",))
    if json_path is not None:
        check_writable(json_path, (".json",))
    try:
        loaded = load_model("reference-image")
        guidance = 4.0
    except WeightFileError as exc:
        console.print(f"[yellow]reference weights unavailable ({exc}); using random-weight tiny-dit[/]")
        loaded = load_model("tiny-dit")
        guidance = 1.0
    labels = [i % (loaded.num_classes or num) for i in range(num)]
    seeds = list(range(num))
    recipe = demo_recipe()
    kwargs = dict(num_steps=steps, guidance_scale=guidance, progress=True)

    t0 = time.perf_counter()
    full = generate(loaded, labels, seeds, **kwargs)
    t_full = time.perf_counter() - t0
    with apply_recipe(loaded.transformer, recipe) as handle:
        t0 = time.perf_counter()
        fast = generate(loaded, labels, seeds, **kwargs)
        t_fast = time.perf_counter() - t0
        stats = handle.stats
    save_image_grid(torch.cat([full, fast]), out, nrow=num, scale=3)
    console.print(f"wrote {out}: top row full model, bottom row recipe {recipe.label!r}")

    common = dict(model=loaded.name, steps=steps, batch=num, device=str(full.device), dtype="float32",
                  guidance_scale=guidance)
    skipped = {m: {k: v for k, v in vals.items() if k.startswith("skipped")} for m, vals in stats.items()}
    rows = [
        dict(common, recipe="full", recipe_json=Recipe().to_json(), latency_ms=t_full * 1e3, speedup=1.0,
             psnr_db=None, identical=True, ssim=1.0, judge_accuracy=_judge_accuracy(loaded, full, labels),
             peak_mem_mb=None, stats={}),
        dict(common, recipe=recipe.label, recipe_json=recipe.to_json(), latency_ms=t_fast * 1e3,
             speedup=t_full / t_fast, psnr_db=psnr(fast, full), identical=False, ssim=ssim(fast, full),
             judge_accuracy=_judge_accuracy(loaded, fast, labels), peak_mem_mb=None, stats=skipped),
    ]
    print_table(rows, console=Console(width=150))
    if json_path is not None:
        json_path.write_text(json.dumps(rows, indent=2) + "\n")
        console.print(f"wrote {json_path}")
    return rows
