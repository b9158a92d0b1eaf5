"""Measure recipes against the full model: latency, speedup, fidelity, memory, FLOPs, judge accuracy.

:func:`run_bench` always measures the full model (``Recipe()``) first and uses it as the baseline
for ``speedup`` (baseline latency / recipe latency) and fidelity (PSNR / SSIM / relative error of the
recipe's pixels against the full model's pixels for the same seeds and labels).

For each recipe it:

1. applies the recipe to ``loaded.transformer`` (recipes with an in-place method run on a fresh
   copy of the transformer instead, with the original parked on the CPU meanwhile, since in-place
   methods cannot be removed);
2. runs ``warmup`` untimed generations, then ``repeats`` timed ones (whole generation: denoising
   loop and decoding to pixels); ``latency_ms`` is the median, ``peak_mem_mb`` the absolute CUDA peak
   over the timed repeats (``None`` on CPU);
3. compares the last output with the full model's, scores it with the model's judge classifier if
   it has one, and copies ``handle.stats`` (real work skipped, as counted by the methods);
4. removes the recipe and **checks the model is restored**: one more generation must be
   bit-identical to the baseline (or within the baseline's own run-to-run jitter when the full
   model is not bit-reproducible on this device); otherwise :class:`RestorationError` is raised.

Row fields (JSON-safe; see :func:`write_json`):

``model, recipe, recipe_json, steps, batch, forward_batch, guidance_scale, cfg_mode, latency_ms,
latency_all_ms, speedup, psnr_db, identical, ssim, rel_error, peak_mem_mb, flops_per_step, device,
device_name, dtype, judge_accuracy, stats, in_place, restored, error, notes``

``psnr_db`` is ``None`` (JSON ``null``) when the output is identical to the full model's, with
``identical: true`` (PSNR would be infinite). ``flops_per_step`` is the full model's FLOPs for one
denoising step (both CFG branches), counted by ``FlopCounterMode``; it is the same in every row.
A recipe whose application or generation raises a :class:`~diffspeed.errors.DiffspeedError` (e.g.
non-finite output) gets a row with ``error`` set and no measurements.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import DiffspeedError
from ..models.bundle import LoadedModel
from ..recipe import Recipe, apply_recipe
from .flops import flops_per_forward
from .metrics import psnr, rel_error, ssim
from .script import fmt as _fmt
from .timing import time_callable, track_peak_memory


class RestorationError(DiffspeedError):
    """A recipe's ``remove()`` did not give back a model with the full model's outputs."""


REQUIRED_FIELDS = (
    "model", "recipe", "recipe_json", "steps", "batch", "latency_ms", "speedup", "psnr_db", "ssim",
    "peak_mem_mb", "flops_per_step", "device", "dtype", "judge_accuracy", "stats",
)


# ---- helpers -------------------------------------------------------------------------------


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _empty_cache(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _clean_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Deep copy of a transformer without diffspeed's per-model state (context, hooks, applied methods)."""
    clone = copy.deepcopy(model)
    for attr in ("_diffspeed_context", "_diffspeed_methods", "_diffspeed_forward_chain"):
        clone.__dict__.pop(attr, None)
    hook = clone.__dict__.pop("_diffspeed_context_hook", None)
    if hook is not None:
        for name in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"):
            hooks = getattr(clone, name, None)
            if hooks is not None:
                hooks.pop(hook.id, None)
    return clone


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine() or "cpu"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _default_labels(loaded: LoadedModel, n: int) -> list[int]:
    k = loaded.num_classes
    return [i % k for i in range(n)] if k else [0] * n


def _default_guidance(loaded: LoadedModel, labels: Sequence[int], device: torch.device) -> float:
    if "guidance_scale" in loaded.extras:
        return float(loaded.extras["guidance_scale"])
    try:
        has_uncond = loaded.make_condition(list(labels), device).uncond is not None
    except Exception:  # noqa: BLE001 - fall back to no guidance
        has_uncond = False
    return 4.0 if has_uncond else 1.0


def _order_recipes(recipes: Sequence[Any]) -> list[Recipe]:
    out: list[Recipe] = []
    for r in recipes:
        if isinstance(r, Recipe):
            out.append(r)
        elif isinstance(r, (list, tuple)):
            out.append(Recipe(tuple(r)))
        else:
            raise DiffspeedError(f"run_bench takes Recipe objects, got {type(r).__name__}")
    full = [r for r in out if not r.methods]
    baseline = full[0] if full else Recipe()
    return [baseline] + [r for r in out if r.methods]


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ---- the runner ----------------------------------------------------------------------------


def run_bench(
    loaded: LoadedModel,
    recipes: Sequence[Recipe],
    *,
    seeds: Sequence[int],
    labels: Sequence[int] | None = None,
    num_steps: int = 25,
    guidance_scale: float | None = None,
    cfg_mode: str = "batched",
    warmup: int = 1,
    repeats: int = 3,
    with_judge: bool = True,
    progress: bool = True,
    console: Any = None,
) -> list[dict[str, Any]]:
    """Measure ``recipes`` (the full model first, always) on ``loaded``; one row per recipe.

    ``labels`` default to ``i % num_classes``; ``guidance_scale`` defaults to
    ``loaded.extras["guidance_scale"]`` if set, else 4.0 when the model has an unconditional
    branch, else 1.0. See the module docstring for the procedure and the row fields.
    """
    from ..sampler import generate, sample

    seeds = [int(s) for s in seeds]
    if not seeds:
        raise DiffspeedError("run_bench needs at least one seed")
    if repeats < 1:
        raise DiffspeedError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise DiffspeedError(f"warmup must be >= 0, got {warmup}")
    device, dtype = _model_device_dtype(loaded.transformer)
    labels = list(labels) if labels is not None else _default_labels(loaded, len(seeds))
    if len(labels) != len(seeds):
        raise DiffspeedError(f"got {len(labels)} labels for {len(seeds)} seeds; give one label per seed")
    if guidance_scale is None:
        guidance_scale = _default_guidance(loaded, labels, device)
    ordered = _order_recipes(recipes)
    forward_batch = len(seeds) * (2 if guidance_scale > 1.0 and cfg_mode == "batched" else 1)
    gen_kw = dict(num_steps=num_steps, guidance_scale=guidance_scale, cfg_mode=cfg_mode)

    def gen(target: LoadedModel) -> torch.Tensor:
        return generate(target, labels, seeds, **gen_kw)

    # FLOPs of one denoising step of the full model (both CFG branches), before anything is applied
    def one_step() -> None:
        cond = loaded.make_condition(list(labels), device)
        sample(loaded.transformer, cond, seeds=seeds, latent_shape=loaded.latent_shape, adapter=loaded.adapter,
               num_steps=1, guidance_scale=guidance_scale, cfg_mode=cfg_mode, check_finite=False)

    flops_per_step = flops_per_forward(None, one_step)

    judge = None
    judge_note = None
    judge_fn = None
    if with_judge and loaded.judge:
        try:
            from ..models.judge import judge_accuracy as judge_fn  # type: ignore[no-redef]
            from ..models.judge import load_judge

            try:
                judge = load_judge(loaded.judge, device=device)
            except TypeError:  # a load_judge without a device option
                judge = load_judge(loaded.judge)
        except Exception as exc:  # noqa: BLE001 - the judge is optional: skip with a note
            judge, judge_fn = None, None
            judge_note = f"judge {loaded.judge!r} unavailable: {type(exc).__name__}: {exc}"

    common = {
        "model": loaded.name,
        "steps": num_steps,
        "batch": len(seeds),
        "forward_batch": forward_batch,
        "guidance_scale": float(guidance_scale),
        "cfg_mode": cfg_mode,
        "flops_per_step": flops_per_step,
        "device": str(device),
        "device_name": _device_name(device),
        "dtype": _dtype_name(dtype),
    }

    rows: list[dict[str, Any]] = []
    base_out: torch.Tensor | None = None
    base_latency: float | None = None
    jitter = 0.0  # the full model's own run-to-run max abs difference (0 when bit-reproducible)

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("bench {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), console=console, transient=True, disable=not progress)
    with bar:
        task = bar.add_task("", total=len(ordered))
        for index, recipe in enumerate(ordered):
            bar.update(task, description=recipe.label)
            is_base = index == 0
            in_place = any(c.in_place for c in recipe.methods)
            row: dict[str, Any] = {
                **common,
                "recipe": recipe.label,
                "recipe_json": json.dumps(recipe.to_dict(), sort_keys=True, default=str),
                "latency_ms": None, "latency_all_ms": None, "speedup": None,
                "psnr_db": None, "identical": None, "ssim": None, "rel_error": None,
                "peak_mem_mb": None, "judge_accuracy": None, "stats": {},
                "in_place": in_place, "restored": None, "error": None, "notes": [],
            }
            if judge_note:
                row["notes"].append(judge_note)

            original = loaded.transformer
            target = loaded
            handle = None
            outputs: list[torch.Tensor] = []

            def run_once() -> None:
                outputs.append(gen(target))
                if len(outputs) > 2:
                    del outputs[0]

            try:
                if in_place:
                    # in-place methods cannot be removed: run on a copy, park the original on the CPU
                    original.to("cpu")
                    _empty_cache(device)
                    work = _clean_copy(original).to(device)
                    target = dataclasses.replace(loaded, transformer=work)
                    row["notes"].append("in-place recipe: measured on a fresh copy of the transformer")
                if recipe.methods:
                    handle = apply_recipe(target.transformer, recipe)
                for _ in range(warmup):
                    run_once()
                with track_peak_memory(device) as mem:
                    timing = time_callable(run_once, warmup=0, repeats=repeats, device=device)
                if is_base:
                    # the baseline's own reproducibility sets the bar for the restoration check
                    jitter = max((_max_abs_diff(o, outputs[-1]) for o in outputs), default=0.0)
                    base_out = outputs[-1]
                    base_latency = timing.median_ms
                    if jitter > 0:
                        row["notes"].append(f"full model not bit-reproducible here (max abs diff {jitter:.3g})")
                out = outputs[-1]
                row["latency_ms"] = timing.median_ms
                row["latency_all_ms"] = timing.all_ms
                row["speedup"] = base_latency / timing.median_ms if timing.median_ms > 0 else None
                row["peak_mem_mb"] = mem["peak_mb"]
                assert base_out is not None
                identical = bool(torch.equal(out, base_out))
                row["identical"] = identical
                p = psnr(out, base_out)
                row["psnr_db"] = None if identical or not math.isfinite(p) else p
                row["ssim"] = ssim(out, base_out) if out.dim() in (4, 5) else None
                row["rel_error"] = rel_error(out, base_out)
                if judge is not None and judge_fn is not None:
                    try:
                        row["judge_accuracy"] = float(judge_fn(judge, out, list(labels)))
                    except Exception as exc:  # noqa: BLE001 - optional metric
                        row["notes"].append(f"judge failed: {type(exc).__name__}: {exc}")
                if handle is not None:
                    row["stats"] = handle.stats
            except DiffspeedError as exc:
                if is_base:
                    raise
                row["error"] = f"{type(exc).__name__}: {exc}"
            finally:
                outputs.clear()
                if in_place:
                    target = loaded
                    work = None  # noqa: F841 - drop the copy
                    _empty_cache(device)
                    original.to(device)
                elif handle is not None:
                    handle.remove()
                handle = None

            if not is_base:
                row["restored"] = _check_restored(loaded, gen, base_out, jitter, recipe)
            else:
                row["restored"] = True
            rows.append(row)
            bar.update(task, advance=1)
    return rows


def _check_restored(loaded: LoadedModel, gen: Any, base_out: torch.Tensor | None, jitter: float, recipe: Recipe) -> bool:
    from ..methods.base import applied_methods

    left = applied_methods(loaded.transformer)
    if left:
        raise RestorationError(f"after removing recipe {recipe.label!r} these methods are still applied: {sorted(left)}")
    after = gen(loaded)
    assert base_out is not None
    if torch.equal(after, base_out):
        return True
    diff = _max_abs_diff(after, base_out)
    if jitter > 0 and diff <= 2 * jitter:
        return True
    raise RestorationError(
        f"recipe {recipe.label!r} did not restore the model: after remove() the output differs from the full "
        f"model's by up to {diff:.3g} (run-to-run jitter of the full model: {jitter:.3g})"
    )


# ---- output ----------------------------------------------------------------------------------


def _stats_summary(stats: Any) -> str:
    if not isinstance(stats, dict):
        return str(stats)
    parts = []
    for method, values in stats.items():
        if isinstance(values, dict) and values:
            inner = ", ".join(f"{k}={_fmt(v, 'g')}" for k, v in values.items())
            parts.append(f"{method}: {inner}")
    return "; ".join(parts)


def print_table(rows: Sequence[dict[str, Any]], console: Any = None) -> None:
    """Print the rows as a rich table (PSNR shows ``inf`` for outputs identical to the full model)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    title = "diffspeed bench"
    if rows:
        r0 = rows[0]
        title += (f": {r0.get('model')} | {r0.get('steps')} steps | batch {r0.get('batch')} | "
                  f"{r0.get('device_name') or r0.get('device')} | {r0.get('dtype')}")
    table = Table(title=title)
    for col, justify in (("recipe", "left"), ("latency ms", "right"), ("speedup", "right"), ("PSNR dB", "right"),
                         ("SSIM", "right"), ("judge acc", "right"), ("peak MiB", "right"),
                         ("GFLOP/step", "right"), ("stats", "left")):
        table.add_column(col, justify=justify)
    for r in rows:
        if r.get("error"):
            table.add_row(str(r.get("recipe")), "[red]error[/]", "-", "-", "-", "-", "-", "-", str(r["error"]))
            continue
        psnr_txt = "inf" if r.get("identical") else _fmt(r.get("psnr_db"), ".2f")
        flops = r.get("flops_per_step")
        table.add_row(
            str(r.get("recipe")),
            _fmt(r.get("latency_ms"), ".1f"),
            _fmt(r.get("speedup"), ".2f") + ("x" if r.get("speedup") is not None else ""),
            psnr_txt,
            _fmt(r.get("ssim"), ".4f"),
            _fmt(r.get("judge_accuracy"), ".3f"),
            _fmt(r.get("peak_mem_mb"), ".0f"),
            _fmt(flops / 1e9 if flops is not None else None, ".2f"),
            _stats_summary(r.get("stats")),
        )
    console.print(table)


def to_jsonable(value: Any) -> Any:
    """Rows -> JSON-legal values: non-finite floats become ``null``, tensors numbers/lists, tuples lists."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return to_jsonable(value.item())
        except Exception:  # noqa: BLE001
            pass
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    return str(value)


def write_json(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write ``rows`` as a JSON list, atomically (temp file in the same folder, then rename).

    Parent folders are created. Non-finite floats are written as ``null`` (PSNR of an identical
    output is ``null`` with ``"identical": true``). Raises :class:`DiffspeedError` naming the path
    if it cannot be written.
    """
    p = Path(path)
    text = json.dumps(to_jsonable(list(rows)), indent=2, allow_nan=False) + "\n"
    if p.exists() and p.is_dir():
        raise DiffspeedError(f"cannot write bench results to {str(p)!r}: it is a directory")
    tmp = None
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
        tmp = None
    except OSError as exc:
        raise DiffspeedError(f"cannot write bench results to {str(p)!r}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return p
