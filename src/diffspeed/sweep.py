"""Benchmark sweeps: a model x seed x recipe grid, run serially or fanned out over Ray.

:func:`run_sweep` builds the grid, runs each part of it with the ordinary bench runner
(:func:`diffspeed.bench.runner.run_bench`) and returns one row per grid cell, with exactly the
fields of a :func:`run_bench` row plus ``seeds`` (the seed group of the cell). ``backend="local"``
runs the tasks one after the other in this process; ``backend="ray"`` submits them as Ray tasks
and gathers the rows as they finish (a progress bar counts finished tasks). Both backends run the
same task function, so they return the same rows, in the same (grid) order; only the timings
(``latency_ms``, ``latency_all_ms``, ``speedup``, ``peak_mem_mb``) differ from run to run.

The grid
--------
* ``models``: model **names** (zoo names, ``reference-*``, a local diffusers directory or a hub id:
  anything :func:`~diffspeed.models.loading.load_model` accepts). Every task loads its model
  itself, on its own worker: models are never shipped through Ray's object store (a model path on
  a cluster must exist on every node, and hub ids are downloaded by each node).
* ``seeds``: seed groups. An entry that is an int is a group of one seed (batch 1); an entry that
  is a list of ints is one batch. Labels are ``i % num_classes`` within a group (as in the CLI).
* ``recipes``: :class:`~diffspeed.recipe.Recipe` objects, JSON strings or recipe file paths. As in
  :func:`run_bench`, the full model (``Recipe()``) is always measured first, since speedup and
  fidelity are relative to it; recipes travel to the workers as JSON, never as pickles.

Rows come in grid order: model, then seed group, then recipe (the full model first).

Task granularity (``group_by``)
-------------------------------
* ``"model_seed"`` (default): one task per (model, seed group) runs every recipe against one
  baseline, exactly what one :func:`run_bench` call does. Fewest model loads.
* ``"cell"``: one task per (model, seed group, recipe). More parallelism; each task measures its
  own baseline (needed for its speedup and fidelity) and keeps only its recipe's row, so the
  baseline is measured once per recipe.

Failures
--------
A task that fails (the model does not load, the full model's generation fails, a Ray worker dies)
does not stop the sweep: each of its cells gets a row with ``error`` set and no measurements.
Argument problems (empty grid, unknown backend, bad recipe JSON, Ray missing) raise
:class:`~diffspeed.errors.DiffspeedError` before anything runs.

Ray
---
``address=None`` starts a local Ray instance (or uses the one already initialised in this process);
``address="auto"`` or ``"ray://host:10001"`` joins a cluster. Each task asks Ray for
``num_cpus_per_task`` CPUs and ``num_gpus_per_task`` GPUs (default: 1 GPU when ``device`` is
CUDA, else 0); with a GPU, Ray sets ``CUDA_VISIBLE_DEVICES`` so ``device="cuda"`` is the task's
own GPU. The workers must be able to import ``diffspeed`` (installed on every node, or shipped with
``ray_init_kwargs={"runtime_env": ...}``). Ray is an optional dependency: ``pip install ray``.

Thread count: Ray limits a CPU task's threads (``OMP_NUM_THREADS`` = its CPU count), and fp32 CPU
results can depend on the thread count in their last bits; pass ``torch_threads`` to pin
``torch.set_num_threads`` in every task (both backends) when rows must be comparable bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import DiffspeedError

__all__ = ["ROW_FIELDS", "TIMING_FIELDS", "SweepTask", "build_tasks", "run_sweep"]

# the fields of a run_bench row (see diffspeed.bench.runner), plus the sweep's "seeds"
ROW_FIELDS = (
    "model", "steps", "batch", "forward_batch", "guidance_scale", "cfg_mode", "flops_per_step", "device",
    "device_name", "dtype", "recipe", "recipe_json", "latency_ms", "latency_all_ms", "speedup", "psnr_db",
    "identical", "ssim", "rel_error", "peak_mem_mb", "judge_accuracy", "stats", "in_place", "restored", "error",
    "notes", "seeds",
)
# fields that depend on the run (timing, memory), not on the computation
TIMING_FIELDS = ("latency_ms", "latency_all_ms", "speedup", "peak_mem_mb")

RAY_INSTALL_HINT = "pip install 'ray>=2.60'"


@dataclass(frozen=True)
class SweepTask:
    """One unit of work: a model, a seed group, and the recipes (as JSON dicts) it measures.

    ``keep`` lists the recipe indices (into ``recipes``) whose rows the task returns; the full
    model is always ``recipes[0]``.
    """

    index: int
    model: str
    seeds: tuple[int, ...]
    recipes: tuple[str, ...]  # recipe JSON texts, full model first
    keep: tuple[int, ...]


def _recipe_json(recipe: Any) -> str:
    from .recipe import Recipe

    if isinstance(recipe, Recipe):
        return json.dumps(recipe.to_dict(), sort_keys=True)
    if isinstance(recipe, (str, bytes)) or hasattr(recipe, "__fspath__"):
        import os

        return json.dumps(Recipe.from_json(os.fsdecode(recipe) if not isinstance(recipe, str) else recipe).to_dict(),
                          sort_keys=True)
    if isinstance(recipe, (list, tuple)):
        return json.dumps(Recipe(tuple(recipe)).to_dict(), sort_keys=True)
    raise DiffspeedError(f"recipes must be Recipe objects, recipe JSON or recipe file paths, got {type(recipe).__name__}")


def _seed_groups(seeds: Sequence[Any]) -> list[tuple[int, ...]]:
    if isinstance(seeds, (int, str)) or not isinstance(seeds, Sequence):
        raise DiffspeedError("seeds must be a list of seeds or of seed groups, e.g. [0, 1] or [[0, 1], [2, 3]]")
    groups: list[tuple[int, ...]] = []
    for entry in seeds:
        group = (entry,) if isinstance(entry, int) else tuple(entry) if isinstance(entry, (list, tuple)) else None
        if not group or not all(isinstance(s, int) and not isinstance(s, bool) for s in group):
            raise DiffspeedError(f"each seeds entry must be an int or a non-empty list of ints, got {entry!r}")
        groups.append(tuple(int(s) for s in group))
    if not groups:
        raise DiffspeedError("run_sweep needs at least one seed")
    return groups


def build_tasks(models: Sequence[str], recipes: Sequence[Any], seeds: Sequence[Any], *,
                group_by: str = "model_seed") -> list[SweepTask]:
    """The sweep's tasks, in grid order (model, seed group, recipe); see the module docstring."""
    from .recipe import Recipe

    if isinstance(models, str) or not models:
        raise DiffspeedError("models must be a non-empty list of model names, e.g. ['tiny-dit']")
    for m in models:
        if not isinstance(m, str):
            raise DiffspeedError(
                f"models must be names (str) that each task loads itself, got {type(m).__name__}; "
                "a loaded model is not sent to the workers"
            )
    if group_by not in ("model_seed", "cell"):
        raise DiffspeedError(f"group_by must be 'model_seed' or 'cell', got {group_by!r}")
    texts = [_recipe_json(r) for r in recipes]
    # the full model first (the baseline: the first recipe without methods, as in run_bench), then the
    # others in the given order, duplicates dropped
    plain = [t for t in texts if not Recipe.from_json(t).methods]
    full = plain[0] if plain else json.dumps(Recipe().to_dict(), sort_keys=True)
    ordered = [full] + [t for i, t in enumerate(texts) if Recipe.from_json(t).methods and t not in texts[:i]]
    groups = _seed_groups(seeds)
    tasks: list[SweepTask] = []
    for model in models:
        for group in groups:
            if group_by == "model_seed":
                tasks.append(SweepTask(len(tasks), model, group, tuple(ordered), tuple(range(len(ordered)))))
            else:
                for i, text in enumerate(ordered):
                    recipes_i = (full,) if i == 0 else (full, text)
                    tasks.append(SweepTask(len(tasks), model, group, recipes_i, (len(recipes_i) - 1,)))
    return tasks


def _error_rows(task: SweepTask, message: str, options: dict[str, Any]) -> list[dict[str, Any]]:
    from .recipe import Recipe

    rows = []
    for i in task.keep:
        recipe = Recipe.from_json(task.recipes[i])
        row = {f: None for f in ROW_FIELDS}
        row.update(model=task.model, steps=options["num_steps"], batch=len(task.seeds), cfg_mode=options["cfg_mode"],
                   device=options["device"], dtype=options["dtype"], recipe=recipe.label,
                   recipe_json=json.dumps(recipe.to_dict(), sort_keys=True, default=str),
                   in_place=any(c.in_place for c in recipe.methods), stats={}, notes=[], error=message,
                   seeds=list(task.seeds))
        rows.append(row)
    return rows


def _run_task(task: SweepTask, options: dict[str, Any]) -> list[dict[str, Any]]:
    """Load the model, run the bench for the task's recipes, return its rows (JSON-safe)."""
    import torch

    from .bench.runner import run_bench, to_jsonable
    from .models.loading import load_model
    from .recipe import Recipe

    threads = options.get("torch_threads")
    saved_threads = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(int(threads))
        loaded = load_model(task.model, device=options["device"], dtype=getattr(torch, options["dtype"]))
        labels = options.get("labels")
        if labels is not None:
            labels = [labels[i % len(labels)] for i in range(len(task.seeds))]
        rows = run_bench(
            loaded, [Recipe.from_json(t) for t in task.recipes], seeds=list(task.seeds), labels=labels,
            num_steps=options["num_steps"], guidance_scale=options["guidance_scale"], cfg_mode=options["cfg_mode"],
            warmup=options["warmup"], repeats=options["repeats"], with_judge=options["with_judge"], progress=False,
        )
        del loaded
    except Exception as exc:  # noqa: BLE001 - one failed task must not stop the sweep
        return _error_rows(task, f"{type(exc).__name__}: {exc}", options)
    finally:
        torch.set_num_threads(saved_threads)
    out = []
    for i in task.keep:
        row = dict(rows[i])
        row["seeds"] = list(task.seeds)
        out.append(to_jsonable(row))
    return out


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise DiffspeedError(
            f"backend='ray' needs Ray, which is not installed ({exc}); install it with {RAY_INSTALL_HINT} "
            "(or the diffspeed extra: pip install 'diffspeed[ray]'), or use backend='local'"
        ) from None
    return ray


def run_sweep(
    models: Sequence[str],
    recipes: Sequence[Any],
    seeds: Sequence[Any],
    *,
    steps: int = 25,
    labels: Sequence[int] | None = None,
    guidance_scale: float | None = None,
    cfg_mode: str = "batched",
    warmup: int = 1,
    repeats: int = 3,
    with_judge: bool = True,
    device: str = "cpu",
    dtype: str = "float32",
    backend: str = "ray",
    address: str | None = None,
    num_gpus_per_task: float | None = None,
    num_cpus_per_task: float = 1,
    group_by: str = "model_seed",
    torch_threads: int | None = None,
    ray_init_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    console: Any = None,
) -> list[dict[str, Any]]:
    """Run the ``models`` x ``seeds`` x ``recipes`` benchmark grid; one row per cell, in grid order.

    ``steps``, ``labels``, ``guidance_scale``, ``cfg_mode``, ``warmup``, ``repeats`` and
    ``with_judge`` are :func:`run_bench`'s options (``labels`` repeat over each seed group);
    ``device`` (``"cpu"``, ``"cuda"``) and ``dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"``)
    say where and how each task loads its model. See the module docstring for the grid, the
    backends, ``group_by`` and ``torch_threads``. The rows can be written with
    :func:`~diffspeed.bench.runner.write_json` and shown with ``print_table``.
    """
    if backend not in ("ray", "local"):
        raise DiffspeedError(f"backend must be 'ray' or 'local', got {backend!r}")
    if not isinstance(steps, int) or steps <= 0:
        raise DiffspeedError(f"steps must be a positive integer, got {steps!r}")
    if repeats < 1 or warmup < 0:
        raise DiffspeedError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise DiffspeedError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise DiffspeedError(f"device must be cpu, cuda[:N] or mps, got {device!r}")
    if backend == "local" and (address is not None or num_gpus_per_task):
        raise DiffspeedError("address and num_gpus_per_task are Ray options; use backend='ray' or leave them unset")
    if labels is not None and not list(labels):
        raise DiffspeedError("labels, when given, must be a non-empty list")
    tasks = build_tasks(models, recipes, seeds, group_by=group_by)
    options = dict(num_steps=steps, labels=list(labels) if labels is not None else None,
                   guidance_scale=guidance_scale, cfg_mode=cfg_mode, warmup=warmup, repeats=repeats,
                   with_judge=with_judge, device=device, dtype=dtype, torch_threads=torch_threads)
    ray = _import_ray() if backend == "ray" else None  # before any work: a clear error when Ray is missing

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(f"sweep ({backend}) {{task.description}}"), BarColumn(),
                   TextColumn("{task.completed}/{task.total} tasks"), TimeElapsedColumn(), console=console,
                   transient=True, disable=not progress)
    results: dict[int, list[dict[str, Any]]] = {}
    with bar:
        bar_task = bar.add_task("", total=len(tasks))
        if ray is None:
            for task in tasks:
                bar.update(bar_task, description=task.model)
                results[task.index] = _run_task(task, options)
                bar.update(bar_task, advance=1)
        else:
            results = _run_ray(ray, tasks, options, address=address, num_gpus=num_gpus_per_task,
                               num_cpus=num_cpus_per_task, init_kwargs=ray_init_kwargs or {},
                               on_done=lambda t: bar.update(bar_task, advance=1, description=t.model))
    return [row for task in tasks for row in results[task.index]]


def _run_ray(ray: Any, tasks: list[SweepTask], options: dict[str, Any], *, address: str | None,
             num_gpus: float | None, num_cpus: float, init_kwargs: dict[str, Any],
             on_done: Any) -> dict[int, list[dict[str, Any]]]:
    if num_gpus is None:
        num_gpus = 1 if str(options["device"]).startswith("cuda") else 0
    if num_gpus < 0 or num_cpus <= 0:
        raise DiffspeedError(f"need num_gpus_per_task >= 0 and num_cpus_per_task > 0, got {num_gpus}, {num_cpus}")
    started = False
    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "log_to_driver": False, **init_kwargs}
        ray.init(address=address, **kwargs)
        started = True
    try:
        remote = ray.remote(_run_task).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)
        pending = {remote.remote(task, options): task for task in tasks}
        results: dict[int, list[dict[str, Any]]] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                task = pending.pop(ref)
                try:
                    results[task.index] = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a dead worker, an unpicklable result: error rows
                    results[task.index] = _error_rows(task, f"Ray task failed: {type(exc).__name__}: {exc}", options)
                on_done(task)
        return results
    finally:
        if started:
            ray.shutdown()
