"""``diffspeed demo``: the shipped reference image model, full vs accelerated, offline in < 1 minute on CPU.

Generates a grid (full model on top, the demo recipe below, same seeds) and measures both with the
bench runner. Falls back to a random-weight tiny DiT (with a warning) only if the reference weights
are missing from the install.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from .errors import DiffspeedError, WeightFileError
from .recipe import Recipe

# the accelerated recipe the demo shows; the strongest reversible recipe that keeps quality
DEMO_RECIPE_JSON = {"name": "demo", "methods": []}


def demo_recipe() -> Recipe:
    return Recipe.from_dict(DEMO_RECIPE_JSON)


def run_demo(out: Path, steps: int, num: int, json_path: Path | None, console: Console) -> list[dict]:
    from .bench.runner import print_table, run_bench, write_json
    from .media import check_writable, save_image_grid
    from .models.loading import load_model
    from .recipe import apply_recipe
    from .sampler import generate

    check_writable(out, (".png",))
    if json_path is not None:
        check_writable(json_path, (".json",))
    torch.set_num_threads(max(1, torch.get_num_threads()))
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
    if not recipe.methods:
        raise DiffspeedError("the demo recipe is empty")
    full = generate(loaded, labels, seeds, num_steps=steps, guidance_scale=guidance, progress=True)
    with apply_recipe(loaded.transformer, recipe):
        fast = generate(loaded, labels, seeds, num_steps=steps, guidance_scale=guidance, progress=True)
    save_image_grid(torch.cat([full, fast]), out, nrow=num, scale=3)
    console.print(f"wrote {out}: top row full model, bottom row recipe {recipe.label!r}")
    rows = run_bench(loaded, [Recipe(), recipe], seeds=seeds, labels=labels, num_steps=steps,
                     guidance_scale=guidance, warmup=0, repeats=1)
    print_table(rows)
    if json_path is not None:
        write_json(rows, json_path)
        console.print(f"wrote {json_path}")
    return rows
