"""Quantization commands of the command line (mounted by :mod:`diffspeed.cli`).

* ``diffspeed calibrate activations``: timestep-grouped activation statistics (static w8a8 scales, SmoothQuant);
* ``diffspeed quantize``: ``ptq_`` (or a mixed-precision plan) applied and saved with ``save_ptq``;
* ``diffspeed calibrate compensation``: the per-step error-compensation table of a quantized checkpoint;
* ``diffspeed plan-bits``: per-layer sensitivity + greedy bit assignment under a size budget;
* ``diffspeed sweep``: the model x seed x recipe benchmark grid (local or Ray).

Convention (as the rest of the CLI): every user mistake raises :class:`DiffspeedError` *before* any
output is written (``diffspeed.cli.main`` turns it into one line on stderr and exit code 2); outputs
are written atomically (temp file / folder in the same directory, then renamed), so a failure never
leaves half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console

from .errors import DiffspeedError

console = Console(stderr=True, soft_wrap=True)
PLAN_KEY = "mixed_precision_plan"


# ---- shared helpers ---------------------------------------------------------------------------------
def _setup(device: str, dtype: str):  # noqa: ANN202
    from .cli import _torch_setup

    return _torch_setup(device, dtype)


def _load(model: str, device: str, dtype: str):  # noqa: ANN202
    from .models.loading import load_model

    dev, dt = _setup(device, dtype)
    return load_model(model, device=dev, dtype=dt)


def _labels(loaded: Any, n: int) -> list[int]:
    from .cli import _labels as cli_labels

    return cli_labels(loaded, None, n)


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise DiffspeedError(f"{name} must be a positive integer, got {value}")


def _check_out_file(out: Optional[Path], suffix: str, flag: str = "--out") -> Path:
    from .media import check_writable

    if out is None:
        raise DiffspeedError(f"{flag} is required: give the {suffix} file to write")
    if out.suffix.lower() != suffix:
        raise DiffspeedError(f"{flag} must end with {suffix}, got {out}")
    return check_writable(out)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(out: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` into a temp file next to ``out`` (same suffix), then rename it onto ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.3f} MiB"


# ---- calibrate activations --------------------------------------------------------------------------
def calibrate_activations(
    model: str = typer.Option("reference-image", help="model name (see `diffspeed models`), local diffusers dir or hub id"),
    seeds: int = typer.Option(8, "--seeds", help="number of calibration samples (seeds --seed .. --seed+N-1), one batch"),
    seed: int = typer.Option(0, help="first calibration seed"),
    steps: int = typer.Option(25, help="denoising steps of the calibration generation (use the generations' step count)"),
    guidance: float = typer.Option(4.0, help="classifier-free guidance scale of the calibration generation"),
    groups: int = typer.Option(4, "--groups", help="timestep groups: one activation scale per layer and group (<= --steps)"),
    out: Optional[Path] = typer.Option(None, help="output .safetensors file (required)"),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
) -> None:
    """Record per-timestep-group activation statistics for static w8a8 scales and SmoothQuant.

    The output feeds `diffspeed quantize --act static --calibration FILE` and `--smooth-alpha`.

    Early (noisy) and late (clean) denoising steps have very different activation ranges, so static
    int8/fp8 activation scales are kept per timestep group. This runs one generation of --seeds samples
    with every linear layer hooked and writes the statistics (safetensors, no pickle).
    """
    _positive("--seeds", seeds)
    _positive("--steps", steps)
    _positive("--groups", groups)
    if guidance < 0:
        raise DiffspeedError(f"--guidance must be >= 0, got {guidance}")
    if groups > steps:
        raise DiffspeedError(f"--groups ({groups}) must be <= --steps ({steps}): every timestep group needs a step")
    out = _check_out_file(out, ".safetensors")
    from .quant.calibration import calibrate

    loaded = _load(model, device, dtype)
    seed_list = [seed + i for i in range(seeds)]
    console.print(f"calibrating {model}: {seeds} samples x {steps} steps, {groups} timestep groups")
    stats = calibrate(loaded, seeds=seed_list, labels=_labels(loaded, seeds), steps=steps, guidance=guidance,
                      num_groups=groups, progress=True)
    stats.extras["model"] = model
    _atomic_write(out, stats.save)
    console.print(f"wrote {out}: {len(stats.layers)} linear layers x {groups} timestep groups")
    console.print(f"use it with `diffspeed quantize --model {model} --format int8_w8a8 --act static "
                  f"--calibration {out} --out <dir>` (add --smooth-alpha 0.5 for SmoothQuant)", highlight=False)


# ---- quantize ---------------------------------------------------------------------------------------
def _check_out_dir(out: Optional[Path]) -> Path:
    from .media import check_parent_writable
    from .methods.ptq import CONFIG_FILE, WEIGHTS_FILE

    if out is None:
        raise DiffspeedError("--out is required: give the directory to write the quantized checkpoint to")
    if out.exists() and not out.is_dir():
        raise DiffspeedError(f"--out {out} is a file; give a directory for the ptq_ checkpoint")
    if out.is_dir():
        extra = sorted(p.name for p in out.iterdir() if p.name not in (CONFIG_FILE, WEIGHTS_FILE))
        if extra:
            raise DiffspeedError(f"--out {out} already holds other files ({', '.join(extra[:3])}); "
                                 "give a new or empty directory (or an old ptq_ checkpoint to overwrite)")
    check_parent_writable(out)
    return out


def _save_dir_atomic(model: Any, out: Path, extra_meta: dict[str, Any] | None = None) -> None:
    """save_ptq into a temp folder next to ``out``, then move its files into ``out``."""
    from .methods.ptq import CONFIG_FILE, WEIGHTS_FILE, save_ptq

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else "."))
    try:
        save_ptq(model, tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            os.chmod(tmp / name, 0o666 & ~_umask())
        if extra_meta:
            meta = json.loads((tmp / CONFIG_FILE).read_text())
            meta.update(extra_meta)
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if out.is_dir():
            for name in (WEIGHTS_FILE, CONFIG_FILE):  # weights first: the config names a complete checkpoint
                os.replace(tmp / name, out / name)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _plan_group_size(in_features: int, fmt: str) -> int:
    if fmt == "int4_weight_only":
        return next((g for g in (128, 64, 32) if in_features % g == 0), 128)
    return 128


def _check_plan(plan: Any, model: Any, device: Any, source: Path) -> None:
    from torch import nn

    from .quant.formats import FORMATS, unavailable_reasons
    from .quant.mixed_precision import NONE

    modules = dict(model.named_modules())
    for fqn, fmt in plan.formats.items():
        if fmt != NONE and fmt not in FORMATS:
            raise DiffspeedError(f"plan {source}: layer {fqn!r} has unknown format {fmt!r}; known: "
                                 f"{', '.join(FORMATS)}, none; recreate it with `diffspeed plan-bits`")
        m = modules.get(fqn)
        if not isinstance(m, nn.Linear):
            raise DiffspeedError(f"plan {source} names layer {fqn!r}, which is not a linear layer of this model; "
                                 "it was made for another model: rerun `diffspeed plan-bits` for this one")
        if fmt != NONE:
            why = unavailable_reasons(fmt, device, in_features=m.in_features, out_features=m.out_features,
                                      group_size=_plan_group_size(m.in_features, fmt))
            if why:
                raise DiffspeedError(f"plan {source}: {fqn} cannot be {fmt} here: {'; '.join(why)}")
    if not plan.quantized_layers:
        raise DiffspeedError(f"plan {source} keeps every layer in float: nothing to quantize")


def _apply_plan(model: Any, plan: Any) -> Any:
    """apply_plan_ and register a ptq_ handle so that save_ptq / load_ptq_ can store and restore it.

    save_ptq records each quantized layer's own format / group size and load_ptq_ rebuilds every layer
    from that per-layer record (the config's ``format`` is not used for the layers), so a mixed plan
    round-trips exactly; the config holds the plan's most common format only because it must name one,
    and the plan itself is stored next to it under ``mixed_precision_plan``.
    """
    from torch import nn

    from .context import get_context
    from .methods.base import _applied
    from .methods.ptq import PTQConfig, PTQReport, _finish
    from .methods.quantize import model_nbytes
    from .quant.formats import QuantLinear, attach_step_group, weight_nbytes
    from .quant.mixed_precision import apply_plan_

    if _applied(model):
        raise DiffspeedError("the model already has methods applied; reload it")
    todo = plan.quantized_layers
    before = model_nbytes(model)
    q_before = sum(weight_nbytes(model.get_submodule(f)) for f in todo)
    apply_plan_(model, plan)
    ctx = get_context(model)
    new = []
    report = PTQReport(Counter(plan.formats[f] for f in todo).most_common(1)[0][0])
    for f in todo:
        ql = model.get_submodule(f)
        if not isinstance(ql, QuantLinear):
            raise DiffspeedError(f"the plan's quantizer made a {type(ql).__name__} for {f}, which save_ptq cannot "
                                 "store; refusing to write a checkpoint that would not load")
        ql.attach_context(ctx)
        new.append(ql)
        report.kernels[f] = ql.kernel
        report.quantized_bytes_after += weight_nbytes(ql)
    attach_step_group(model, new, ctx)
    report.quantized = list(todo)
    report.skipped = {f: "kept in float by the plan" if f in plan.formats else "not in the plan"
                      for f, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear)}
    report.quantized_bytes_before = q_before
    report.weight_bytes_before = before
    report.weight_bytes_after = model_nbytes(model)
    _applied(model)[PTQConfig.method] = _finish(model, PTQConfig(format=report.format, fuse_gelu=False), report)
    return report


def quantize(
    model: str = typer.Option("reference-image", help="model name (see `diffspeed models`), local diffusers dir or hub id"),
    fmt: Optional[str] = typer.Option(None, "--format", help="int8_w8a8 | fp8_w8a8 | int8_weight_only | int4_weight_only (default int8_w8a8)"),
    act: str = typer.Option("dynamic", help="activation scales of w8a8: dynamic (per token at run time) or static (per timestep group, needs --calibration)"),
    calibration: Optional[Path] = typer.Option(None, help="activation stats from `diffspeed calibrate activations` (for --act static / --smooth-alpha)"),
    smooth_alpha: Optional[str] = typer.Option(None, help="SmoothQuant migration strength in [0, 1], or 'auto' to pick it by measured fidelity (w8a8 only; needs --calibration)"),
    search_steps: int = typer.Option(10, help="--smooth-alpha auto: sampling steps of each trial"),
    search_seeds: int = typer.Option(4, help="--smooth-alpha auto: samples per trial"),
    group_size: int = typer.Option(128, help="int4 group size (32, 64, 128, 256)"),
    gptq: bool = typer.Option(False, "--gptq/--no-gptq", help="GPTQ error-compensating rounding (int4 / int8 formats): calibrates each layer's input second moment over full generations first"),
    gptq_seeds: int = typer.Option(8, help="--gptq: calibration samples (seeds 9000.., classes cycled)"),
    gptq_steps: int = typer.Option(25, help="--gptq: sampling steps of each calibration generation"),
    int4_kernel: str = typer.Option("auto", help="int4: auto (= dequant) | tinygemm (torch's small-M int4 kernel) | dequant (int4 storage, float GEMM)"),
    fuse_gelu: bool = typer.Option(True, "--fuse-gelu/--no-fuse-gelu", help="dynamic fp8: run each FFN's tanh GELU inside the one-pass activation-quantization kernel"),
    quantize_embeddings: bool = typer.Option(False, "--quantize-embeddings/--float-embeddings", help="also store nn.Embedding tables (DiT's class-label tables) as int8 rows"),
    include: Optional[List[str]] = typer.Option(None, "--include", help="regex of layers to quantize even if sensitive (repeatable)"),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="regex of layers to keep in float (repeatable)"),
    keep_sensitive: bool = typer.Option(True, "--keep-sensitive/--quantize-sensitive", help="keep embeddings, adaLN modulation and final layers in float"),
    plan: Optional[Path] = typer.Option(None, help="mixed-precision plan from `diffspeed plan-bits` (instead of --format)"),
    out: Optional[Path] = typer.Option(None, help="output directory of the ptq_ checkpoint (required)"),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
) -> None:
    """Quantize a model's linear layers onto diffspeed's low-bit kernels (ptq_) and save the checkpoint.

    Smaller weights and, on GPUs, int8/fp8 matmuls. The checkpoint (safetensors + JSON, no pickle) loads
    with `diffspeed.methods.ptq.load_ptq_(model, DIR)` and is the input of `diffspeed calibrate
    compensation`. With --plan, each layer gets the format a `diffspeed plan-bits` plan chose.
    """
    from .methods.ptq import PTQConfig, ptq_model_
    from .quant.formats import FORMATS

    if gptq and (gptq_seeds <= 0 or gptq_steps <= 0):
        raise DiffspeedError("--gptq-seeds and --gptq-steps must be positive")
    if plan is not None:
        conflicts = [n for n, on in (("--gptq", gptq), ("--format", fmt is not None), ("--act static", act != "dynamic"),
                                     ("--calibration", calibration is not None), ("--smooth-alpha", smooth_alpha is not None),
                                     ("--include", bool(include)), ("--exclude", bool(exclude)), ("--quantize-embeddings", quantize_embeddings)) if on]
        if conflicts:
            raise DiffspeedError(f"--plan fixes every layer's format; drop {', '.join(conflicts)} "
                                 "(or drop --plan to quantize with one format)")
    fmt = fmt or "int8_w8a8"
    auto_alpha = smooth_alpha is not None and smooth_alpha.strip().lower() == "auto"
    if smooth_alpha is not None and not auto_alpha:
        try:
            smooth_alpha = float(smooth_alpha)
        except ValueError:
            raise DiffspeedError(f"--smooth-alpha must be a number in [0, 1] or 'auto', got {smooth_alpha!r}") from None
    if fmt not in FORMATS:
        raise DiffspeedError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
    if act not in ("dynamic", "static"):
        raise DiffspeedError(f"--act must be dynamic or static, got {act!r}")
    needs = [n for n, on in (("--act static", act == "static"), ("--smooth-alpha", smooth_alpha is not None)) if on]
    if needs and calibration is None:
        raise DiffspeedError(f"{' and '.join(needs)} need(s) --calibration STATS: make it with "
                             f"`diffspeed calibrate activations --model {model} --out stats.safetensors`")
    out = _check_out_dir(out)
    stats = None
    loaded_plan = None
    if plan is not None:
        from .quant.mixed_precision import MixedPrecisionPlan

        loaded_plan = MixedPrecisionPlan.load(plan)
        config = None
    else:
        config = PTQConfig(format=fmt, act=act,
                           calibration=str(calibration.resolve()) if calibration is not None else None,
                           smooth_alpha=None if auto_alpha else smooth_alpha,
                           include=tuple(include or ()), exclude=tuple(exclude or ()),
                           skip_sensitive=keep_sensitive, group_size=group_size, int4_kernel=int4_kernel, gptq=gptq,
                           fuse_gelu=fuse_gelu, quantize_embeddings=quantize_embeddings)
        if calibration is not None:
            from .quant.calibration import ActivationStats

            stats = ActivationStats.load(calibration)
    loaded = _load(model, device, dtype)
    transformer = loaded.transformer
    if loaded_plan is not None:
        from .methods.ptq import _device

        _check_plan(loaded_plan, transformer, _device(transformer), plan)
        report = _apply_plan(transformer, loaded_plan)
        extra = {PLAN_KEY: loaded_plan.to_dict(),
                 "note": "mixed-precision checkpoint: every layer's format is in 'layers'; 'config.format' is only "
                         "the most common one. Load it with load_ptq_; a ptq_ recipe cannot reproduce it."}
    else:
        if stats is not None:
            stats.check_model(transformer)
        if auto_alpha:
            import dataclasses

            from .quant.alpha_search import search_smooth_alpha

            if search_steps <= 0 or search_seeds <= 0:
                raise DiffspeedError("--search-steps and --search-seeds must be positive")
            with console.status("searching the SmoothQuant alpha (one short generation per candidate)"):
                best, scores = search_smooth_alpha(loaded, config, stats=stats, steps=search_steps,
                                                   seeds=list(range(9000, 9000 + search_seeds)))
            console.print("SmoothQuant alpha search (PSNR dB vs unquantized): "
                          + ", ".join(f"{k}: {v:.2f}" for k, v in scores.items()) + f" -> {best}")
            config = dataclasses.replace(config, smooth_alpha=best)
        if config.gptq:
            from .methods.ptq import ptq_gptq_

            seeds = list(range(9000, 9000 + gptq_seeds))
            labels = _labels(loaded, gptq_seeds)
            with console.status(f"GPTQ: collecting input second moments over {gptq_seeds} x {gptq_steps}-step "
                                "generations, then quantizing"):
                report = ptq_gptq_(loaded, config, seeds=seeds, labels=labels, num_steps=gptq_steps, stats=stats)
        else:
            report = ptq_model_(transformer, config, stats=stats)
        extra = None
    _save_dir_atomic(transformer, out, extra)
    kernels = Counter(report.kernels.values())
    formats = Counter(loaded_plan.formats[f] for f in report.quantized) if loaded_plan is not None else {fmt: len(report.quantized)}
    console.print(f"wrote {out}: {len(report.quantized)} layers quantized "
                  f"({', '.join(f'{n} {k}' for k, n in formats.items())}), {len(report.skipped)} kept in float")
    console.print(f"kernels: {', '.join(f'{k} x{n}' for k, n in sorted(kernels.items()))}")
    console.print(f"weights (whole transformer): {_mb(report.weight_bytes_before)} -> {_mb(report.weight_bytes_after)}; "
                  f"quantized layers: {_mb(report.quantized_bytes_before)} -> {_mb(report.quantized_bytes_after)}")
    if loaded_plan is None:
        console.print(f"calibrate error compensation with `diffspeed calibrate compensation --model {model} "
                      f"--quantized {out} --out table.json`", highlight=False)


# ---- calibrate compensation -------------------------------------------------------------------------
def _read_ptq_meta(path: Path) -> dict[str, Any]:
    from .methods.ptq import CONFIG_FILE, WEIGHTS_FILE

    if not path.is_dir() or not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise DiffspeedError(f"--quantized {path} is not a ptq_ checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                             "make one with `diffspeed quantize --out DIR`")
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DiffspeedError(f"{path / CONFIG_FILE} is not readable JSON ({exc}); recreate it with `diffspeed quantize`") from None
    from .methods.ptq import PTQ_FORMAT_VERSION

    if not isinstance(meta, dict) or meta.get("diffspeed_ptq") != PTQ_FORMAT_VERSION:
        raise DiffspeedError(f"{path / CONFIG_FILE} is not a ptq_ checkpoint config of format {PTQ_FORMAT_VERSION}; "
                             "recreate it with `diffspeed quantize`")
    return meta


def calibrate_compensation_cmd(
    model: str = typer.Option("reference-image", help="the full-precision model the checkpoint was quantized from"),
    quantized: Optional[Path] = typer.Option(None, help="ptq_ checkpoint directory from `diffspeed quantize` (required)"),
    seeds: int = typer.Option(8, "--seeds", help="number of calibration samples (seeds --seed .. --seed+N-1), one batch"),
    seed: int = typer.Option(0, help="first calibration seed"),
    steps: int = typer.Option(25, help="denoising steps: the table is only valid for generations with this step count"),
    guidance: float = typer.Option(4.0, help="classifier-free guidance scale of those generations"),
    shift: float = typer.Option(1.0, help="sigma shift of the flow-matching schedule"),
    ridge: float = typer.Option(1.0, help="weight (in samples) of the prior toward no correction"),
    out: Optional[Path] = typer.Option(None, help="output table .json (required)"),
    recipe_out: Optional[Path] = typer.Option(None, help="also write a recipe .json: the checkpoint's ptq_ config + error_compensation"),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
) -> None:
    """Fit the error-compensation table of a quantized checkpoint (for the error_compensation method).

    The table is a per-step, per-channel velocity correction that pulls the quantized model back onto
    the full model's trajectory.

    Quantization error accumulates over the denoising steps; the table corrects each step's output along
    the quantized trajectory itself, so the drift of earlier steps is corrected too. Use it with the
    recipe entry {"method": "error_compensation", "table": "table.json"} after the same quantization.
    """
    _positive("--seeds", seeds)
    _positive("--steps", steps)
    if guidance < 0:
        raise DiffspeedError(f"--guidance must be >= 0, got {guidance}")
    if ridge < 0:
        raise DiffspeedError(f"--ridge must be >= 0, got {ridge}")
    if quantized is None:
        raise DiffspeedError("--quantized is required: the ptq_ checkpoint directory written by `diffspeed quantize`")
    meta = _read_ptq_meta(quantized)
    out = _check_out_file(out, ".json")
    if recipe_out is not None:
        recipe_out = _check_out_file(recipe_out, ".json", "--recipe-out")
        if recipe_out.resolve() == out.resolve():
            raise DiffspeedError("--recipe-out and --out must be different files")
        if PLAN_KEY in meta:
            raise DiffspeedError(f"{quantized} was quantized with a mixed-precision plan, which no ptq_ recipe "
                                 "reproduces: drop --recipe-out and load the checkpoint with load_ptq_")
    from .methods.ptq import load_ptq_
    from .quant.compensation import calibrate_compensation

    full = _load(model, device, dtype)
    quant = _load(model, device, dtype)
    load_ptq_(quant.transformer, quantized)
    seed_list = [seed + i for i in range(seeds)]
    with console.status(f"fitting error compensation: {seeds} samples x {steps} steps (full, quantized, corrected)"):
        table = calibrate_compensation(full.transformer, quant.transformer, loaded=full, seeds=seed_list,
                                       labels=_labels(full, seeds), num_steps=steps, guidance_scale=guidance,
                                       shift=shift, ridge=ridge, name=model)
    table.calibration["quantized"] = str(quantized.resolve())
    _atomic_write(out, table.save)
    s = table.stats
    console.print(f"wrote {out}: {steps} steps x {table.latent_channels} channels; calibration final-latent MSE vs full "
                  f"{s['final_mse_uncorrected']:.4g} uncorrected -> {s['final_mse_corrected']:.4g} corrected")
    if not s["final_mse_corrected"] < s["final_mse_uncorrected"]:
        console.print("warning: on the calibration samples the correction does not lower the error; use more --seeds "
                      "(8+) or a larger --ridge, and check it with `diffspeed bench`", highlight=False)
    entry = {"method": "error_compensation", "table": str(out.resolve())}
    if recipe_out is not None and "config" in meta:
        from .methods.base import config_from_dict
        from .recipe import Recipe

        try:
            ptq_cfg = config_from_dict(meta["config"])
        except DiffspeedError as exc:
            raise DiffspeedError(f"{quantized}: its ptq_ config cannot be read back ({exc}); recreate it") from None
        from .methods.error_compensation import ErrorCompensationConfig

        recipe = Recipe((ptq_cfg, ErrorCompensationConfig(table=entry["table"])), name="ptq_+error_compensation")
        _atomic_write(recipe_out, lambda p: recipe.to_json(p))
        console.print(f"wrote {recipe_out}: use it with `diffspeed generate --model {model} --steps {steps} "
                      f"--recipe {recipe_out}`", highlight=False)
    else:
        console.print(f"use it after the same quantization with the recipe entry {json.dumps(entry)} "
                      f"(generations of {steps} steps)", highlight=False)


# ---- plan-bits --------------------------------------------------------------------------------------
def plan_bits(
    model: str = typer.Option("reference-image", help="model name (see `diffspeed models`), local diffusers dir or hub id"),
    formats: str = typer.Option("int8_w8a8,int4_weight_only", help="comma-separated candidate formats per layer"),
    budget_mb: Optional[float] = typer.Option(None, help="size budget of the whole transformer's weights, MB (1e6 bytes)"),
    budget_fraction: Optional[float] = typer.Option(None, help="size budget as a fraction of the float model's size, in (0, 1]"),
    seeds: int = typer.Option(4, "--seeds", help="calibration samples whose transformer calls measure sensitivity"),
    seed: int = typer.Option(0, help="first calibration seed"),
    steps: int = typer.Option(25, help="denoising steps of the calibration run"),
    guidance: float = typer.Option(4.0, help="classifier-free guidance scale of the calibration run"),
    keep_steps: int = typer.Option(3, help="evenly spaced steps whose transformer calls are replayed"),
    keep_sensitive: bool = typer.Option(True, "--keep-sensitive/--quantize-sensitive", help="keep embeddings, adaLN modulation and final layers in float"),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="regex of layers to keep in float (repeatable)"),
    out: Optional[Path] = typer.Option(None, help="output plan .json (required)"),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
) -> None:
    """Choose a format per layer under a size budget (mixed precision) and write the plan.

    Layers differ a lot in how much quantization hurts them: each candidate (layer, format) is measured
    alone (transformer-output MSE on real calibration calls), then the cheapest loss per byte saved is
    taken first until the budget holds. Apply the plan with `diffspeed quantize --plan plan.json --out DIR`.
    """
    import re

    from .quant.formats import FORMATS

    cands = [f.strip() for f in formats.split(",") if f.strip()]
    if not cands:
        raise DiffspeedError(f"--formats needs at least one of {', '.join(FORMATS)}")
    bad = [f for f in cands if f not in FORMATS]
    if bad:
        raise DiffspeedError(f"unknown format {bad[0]!r} in --formats; use some of {', '.join(FORMATS)}")
    cands = list(dict.fromkeys(cands))
    if (budget_mb is None) == (budget_fraction is None):
        raise DiffspeedError("give exactly one budget: --budget-mb MB or --budget-fraction F (e.g. 0.4)")
    if budget_mb is not None and budget_mb <= 0:
        raise DiffspeedError(f"--budget-mb must be > 0, got {budget_mb}")
    if budget_fraction is not None and not 0 < budget_fraction <= 1:
        raise DiffspeedError(f"--budget-fraction must be in (0, 1], got {budget_fraction}")
    _positive("--seeds", seeds)
    _positive("--steps", steps)
    _positive("--keep-steps", keep_steps)
    if guidance < 0:
        raise DiffspeedError(f"--guidance must be >= 0, got {guidance}")
    for pattern in exclude or ():
        try:
            re.compile(pattern)
        except re.error as exc:
            raise DiffspeedError(f"--exclude {pattern!r} is not a valid regex: {exc}") from None
    out = _check_out_file(out, ".json")

    from types import SimpleNamespace

    from .methods.ptq import _device
    from .methods.quantize import model_nbytes
    from .methods.quantize import select_layers
    from .quant.formats import unavailable_reasons
    from .quant.mixed_precision import NONE, assign_bits, capture_calib_inputs, layer_sensitivity, measure_layer_bytes

    loaded = _load(model, device, dtype)
    transformer = loaded.transformer
    dev = _device(transformer)
    shim = SimpleNamespace(include=(), exclude=tuple(exclude or ()), skip_sensitive=keep_sensitive, backend=None)
    layers, _skipped = select_layers(transformer, shim)  # type: ignore[arg-type]
    ok: dict[str, list[str]] = {}
    for fmt in cands:
        ok[fmt] = [f for f in layers if not unavailable_reasons(
            fmt, dev, in_features=(m := transformer.get_submodule(f)).in_features, out_features=m.out_features,
            group_size=_plan_group_size(m.in_features, fmt))]
    layers = [f for f in layers if any(f in ok[fmt] for fmt in cands)]
    if not layers:
        raise DiffspeedError(f"no layer of {model} can take any of {', '.join(cands)} on {dev.type}; "
                             "try other --formats (e.g. int8_w8a8)")
    # sizes first (cheap): refuse an unreachable budget before the sensitivity runs
    layer_bytes = measure_layer_bytes(transformer, layers, [])
    for fmt in cands:
        for f, row in measure_layer_bytes(transformer, ok[fmt], [fmt]).items():
            layer_bytes[f][fmt] = row[fmt]
    total = model_nbytes(transformer)
    fixed = total - sum(layer_bytes[f][NONE] for f in layers)
    if budget_fraction is not None:
        budget_mb = budget_fraction * total / 1e6
    lowest = (fixed + sum(min(row.values()) for row in layer_bytes.values())) / 1e6
    if lowest > budget_mb + 1e-9:
        raise DiffspeedError(f"size budget {budget_mb:.6g} MB is unreachable with {', '.join(cands)}: every "
                             f"quantizable layer at its smallest format gives {lowest:.6g} MB (float: {total / 1e6:.6g} MB); "
                             f"raise the budget to at least {lowest:.6g} MB or add a smaller format to --formats")
    inputs = capture_calib_inputs(loaded, seeds=[seed + i for i in range(seeds)], labels=_labels(loaded, seeds),
                                  num_steps=steps, guidance_scale=guidance, keep_steps=keep_steps)
    sens: dict[str, dict[str, float]] = {f: {NONE: 0.0} for f in layers}
    for fmt in cands:
        if ok[fmt]:
            console.print(f"sensitivity of {len(ok[fmt])} layers to {fmt} on {len(inputs)} transformer calls")
            for f, row in layer_sensitivity(transformer, ok[fmt], [fmt], inputs, progress=True).items():
                sens[f][fmt] = row[fmt]
    plan = assign_bits(sens, layer_bytes, budget_mb=budget_mb, fixed_bytes=fixed)
    plan.budget.update({"budget_fraction": budget_fraction, "float_bytes": int(total), "model": model,
                        "calibration": {"seeds": seeds, "seed": seed, "steps": steps, "guidance": guidance}})
    _atomic_write(out, plan.save)
    counts = Counter(plan.formats.values())
    console.print(f"wrote {out}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + " layers")
    console.print(f"predicted size {plan.predicted_bytes / 1e6:.4f} MB (budget {budget_mb:.4f} MB, float "
                  f"{total / 1e6:.4f} MB), predicted loss (sum of single-layer MSEs) {plan.predicted_loss:.4g}")
    console.print(f"apply it with `diffspeed quantize --model {model} --plan {out} --out <dir>`", highlight=False)


# ---- sweep ------------------------------------------------------------------------------------------
def _split_list(values: Optional[List[str]]) -> list[str]:
    out: list[str] = []
    for v in values or ():
        if v.lstrip().startswith(("{", "[")):
            out.append(v)  # inline JSON recipe: commas belong to it
        else:
            out.extend(p.strip() for p in v.split(",") if p.strip())
    return out


def _check_model_name(name: str) -> None:
    from .models import loading

    if name in loading.known_names() or Path(name).expanduser().is_dir() or loading._HUB_ID.match(name):
        return
    raise DiffspeedError(f"unknown model {name!r} in --models; {loading._known_line()}")


def sweep(
    models: Optional[List[str]] = typer.Option(None, "--models", help="comma-separated model names (repeatable)"),
    recipes: Optional[List[str]] = typer.Option(None, "--recipes", help="comma-separated recipe JSON files or inline JSON (repeatable); the full model is always measured"),
    seeds: str = typer.Option("0", help="comma-separated seeds, each one cell; '0+1' is a batch of two seeds"),
    steps: int = typer.Option(25, help="denoising steps"),
    guidance: Optional[float] = typer.Option(None, help="classifier-free guidance scale (default: the bench's)"),
    cfg_mode: str = typer.Option("batched", help="batched | separate"),
    repeats: int = typer.Option(3, help="timed repeats per cell (median reported)"),
    warmup: int = typer.Option(1, help="untimed warm-up runs per cell"),
    judge: bool = typer.Option(True, "--judge/--no-judge", help="score judge accuracy where the model has a judge"),
    backend: str = typer.Option("local", help="local (this process, one task after the other) | ray (Ray tasks)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address ('auto', 'ray://host:10001'); default: a local Ray"),
    group_by: str = typer.Option("model_seed", help="model_seed (one task per model and seed group) | cell (one per recipe too)"),
    torch_threads: Optional[int] = typer.Option(None, help="pin torch threads in every task (comparable results bit for bit)"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the rows here (.json)"),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
) -> None:
    """Benchmark a models x seeds x recipes grid (latency, speedup, PSNR/SSIM, memory) locally or over Ray.

    Each (model, seed group) task loads its model itself and measures the full model first, then every
    recipe against it; a failed task gives rows with `error` set instead of stopping the sweep.
    """
    model_list = _split_list(models)
    if not model_list:
        raise DiffspeedError("--models is required, e.g. --models reference-image")
    recipe_list = _split_list(recipes)
    groups: list[Any] = []
    for part in (p.strip() for p in seeds.split(",")):
        try:
            group = [int(s) for s in part.split("+")]
        except ValueError:
            raise DiffspeedError(f"--seeds must be comma-separated integers (a+b for a batch), got {seeds!r}") from None
        groups.append(group[0] if len(group) == 1 else group)
    _positive("--steps", steps)
    _positive("--repeats", repeats)
    if warmup < 0:
        raise DiffspeedError(f"--warmup must be >= 0, got {warmup}")
    if guidance is not None and guidance < 0:
        raise DiffspeedError(f"--guidance must be >= 0, got {guidance}")
    if backend not in ("local", "ray"):
        raise DiffspeedError(f"--backend must be local or ray, got {backend!r}")
    if cfg_mode not in ("batched", "separate"):
        raise DiffspeedError(f"--cfg-mode must be batched or separate, got {cfg_mode!r}")
    _setup(device, dtype)
    if json_path is not None:
        from .media import check_writable

        check_writable(json_path, (".json",))
    for name in model_list:
        _check_model_name(name)
    from .bench.runner import print_table, write_json
    from .sweep import build_tasks, run_sweep

    build_tasks(model_list, recipe_list, groups, group_by=group_by)  # recipe / grid errors before any work
    rows = run_sweep(model_list, recipe_list, groups, steps=steps, guidance_scale=guidance, cfg_mode=cfg_mode,
                     warmup=warmup, repeats=repeats, with_judge=judge, device=device, dtype=dtype, backend=backend,
                     address=address, group_by=group_by, torch_threads=torch_threads, progress=True, console=console)
    print_table(rows)
    failed = [r for r in rows if r.get("error")]
    if json_path is not None:
        write_json(rows, json_path)
        console.print(f"wrote {json_path}: {len(rows)} rows")
    if failed:
        for r in failed[:5]:
            console.print(f"failed: {r['model']} seeds {r['seeds']} {r['recipe']}: {r['error']}", highlight=False)
        console.print(f"{len(failed)}/{len(rows)} cells failed (rows with 'error' set)")
        raise typer.Exit(1)


def register(app: typer.Typer, calibrate_app: typer.Typer | None) -> None:
    """Mount the commands on the main app (and the ``calibrate`` group when it exists)."""
    app.command("quantize")(quantize)
    app.command("plan-bits")(plan_bits)
    app.command("sweep")(sweep)
    if calibrate_app is not None:
        calibrate_app.command("activations")(calibrate_activations)
        calibrate_app.command("compensation")(calibrate_compensation_cmd)


__all__ = ["calibrate_activations", "calibrate_compensation_cmd", "plan_bits", "quantize", "register", "sweep"]
