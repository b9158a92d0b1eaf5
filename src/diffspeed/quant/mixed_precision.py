"""Mixed-precision bit assignment under a size or latency budget (after BitsFusion).

Layers differ a lot in how much quantizing them hurts: a few (adaLN modulation, output projections)
dominate the error while most tolerate low bits. So instead of one format for every layer:

1. :func:`layer_sensitivity` swaps *one* layer at a time for its quantized version and measures the
   transformer-output MSE against the unquantized model on fixed calibration inputs (real
   ``(x_t, t, conditioning)`` calls captured from a short sampler run by :func:`capture_calib_inputs`),
   then puts the original module back (the same object: outputs are bit-identical afterwards);
2. :func:`assign_bits` starts every layer at ``"none"`` (kept in float) and greedily takes the move
   (one layer to one smaller format) with the smallest loss increase per byte saved (or per ms saved
   for a latency budget) until the budget is met; single-layer losses are treated as additive;
3. :func:`apply_plan_` swaps the chosen layers in place.

Quantizers are injected: ``quantize_fn(linear, fmt) -> nn.Module`` and ``nbytes_fn(module) -> int``
default to :func:`diffspeed.quant.formats.quantize_linear` / ``weight_nbytes`` (imported lazily).
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..errors import DiffspeedError

NONE = "none"
FORMAT = "diffspeed-mixed-precision/1"
QuantizeFn = Callable[[nn.Linear, str], nn.Module]
NbytesFn = Callable[[nn.Module], int]


# ---- injected defaults ----------------------------------------------------------------------------
def default_quantize_fn(linear: nn.Linear, fmt: str) -> nn.Module:
    """:func:`~diffspeed.quant.formats.quantize_linear`; int4 groups shrink (128 -> 64 -> 32) to divide
    ``in_features``, since small DiTs have widths such as 192 that 128 does not divide."""
    from .formats import quantize_linear  # lazily: formats is written alongside and needs its kernels

    if fmt == "int4_weight_only":
        group = next((g for g in (128, 64, 32) if linear.in_features % g == 0), 128)
        return quantize_linear(linear, fmt, group_size=group)
    return quantize_linear(linear, fmt)


def default_nbytes_fn(module: nn.Module) -> int:
    from .formats import weight_nbytes

    return int(weight_nbytes(module))


def float_nbytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers as stored (the size of a layer kept in float)."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


# ---- module access --------------------------------------------------------------------------------
def _split(fqn: str) -> tuple[str, str]:
    parent, _, child = fqn.rpartition(".")
    return parent, child


def _get(model: nn.Module, fqn: str) -> nn.Module:
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        raise DiffspeedError(
            f"the model has no module {fqn!r}; list the linear layers with "
            "`[n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]`"
        ) from None


def _set(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent, child = _split(fqn)
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _linear(model: nn.Module, fqn: str) -> nn.Linear:
    mod = _get(model, fqn)
    if not isinstance(mod, nn.Linear):
        raise DiffspeedError(f"module {fqn!r} is a {type(mod).__name__}, not an nn.Linear (already quantized?); "
                             "reload the model or drop it from the layer list")
    return mod


def linear_fqns(model: nn.Module, include: Callable[[str, nn.Linear], bool] | None = None) -> list[str]:
    """Names of the model's ``nn.Linear`` layers (optionally filtered by ``include(fqn, module)``)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and (include is None or include(n, m))]


# ---- calibration inputs ---------------------------------------------------------------------------
@dataclass
class CalibInput:
    """One recorded transformer call: positional and keyword arguments, replayed as ``model(*args, **kwargs)``."""

    args: tuple
    kwargs: dict[str, Any]
    step: int


def _detach(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, (list, tuple)):
        return type(v)(_detach(x) for x in v)
    if isinstance(v, dict):
        return {k: _detach(x) for k, x in v.items()}
    return v


def _output_tensor(out: Any) -> torch.Tensor:
    from ..hooks import output_tensor

    y = output_tensor(out)
    if y is not None:
        return y
    raise DiffspeedError(f"cannot find the prediction in a transformer output of type {type(out).__name__}")


@torch.no_grad()
def capture_calib_inputs(
    loaded: Any,
    *,
    seeds: Sequence[int],
    labels: Sequence[int] | None = None,
    num_steps: int = 8,
    guidance_scale: float = 1.0,
    shift: float = 1.0,
    keep_steps: Sequence[int] | int = 3,
) -> list[CalibInput]:
    """Record the transformer's real calls (x_t, t, conditioning) during a short sampler run.

    ``keep_steps``: the step indices to keep, or how many evenly spaced steps (first and last
    included). Sensitivity is then measured on states the model really sees, at several noise levels.
    """
    from ..hooks import wrap_forward
    from ..sampler import sample

    model = loaded.transformer
    labels = list(labels) if labels is not None else [i % (loaded.num_classes or 1) for i in range(len(seeds))]
    if isinstance(keep_steps, int):
        k = max(1, min(keep_steps, num_steps))
        keep = {round(j * (num_steps - 1) / max(1, k - 1)) for j in range(k)} if k > 1 else {0}
    else:
        keep = {int(s) for s in keep_steps}
    from ..context import get_context

    ctx = get_context(model)
    recorded: list[CalibInput] = []

    def record(inner: Any, *args: Any, **kwargs: Any) -> Any:
        if ctx.step_index in keep:
            recorded.append(CalibInput(_detach(args), _detach(kwargs), ctx.step_index))
        return inner(*args, **kwargs)

    handle = wrap_forward(getattr(model, "_orig_mod", model), record)
    try:
        device = next(model.parameters()).device
        sample(model, loaded.make_condition(labels, device), seeds=list(seeds), latent_shape=loaded.latent_shape,
               num_steps=num_steps, guidance_scale=guidance_scale, shift=shift, adapter=loaded.adapter)
    finally:
        handle.remove()
    if not recorded:
        raise DiffspeedError(f"no transformer call was recorded at steps {sorted(keep)} of {num_steps}; "
                             "pick keep_steps inside the run")
    return recorded


def _run_all(model: nn.Module, inputs: Sequence[CalibInput]) -> list[torch.Tensor]:
    return [_output_tensor(model(*c.args, **c.kwargs)).float() for c in inputs]


def _progress(enabled: bool, total: int, label: str):
    if not enabled:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), transient=True)
    task = bar.add_task("", total=total)
    bar.start()
    return bar, task


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    layer_fqns: Sequence[str],
    candidates: Sequence[str],
    calib_inputs: Sequence[CalibInput],
    quantize_fn: QuantizeFn | None = None,
    *,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """``{fqn: {fmt: mse}}``: transformer-output MSE when only ``fqn`` is quantized to ``fmt``.

    Each layer is quantized from a copy (the quantizer cannot touch the original) and the original
    module object is put back afterwards, so the model is bit-identical when this returns. ``"none"``
    is always 0 and added to every row.
    """
    quantize_fn = quantize_fn or default_quantize_fn
    candidates = [c for c in candidates if c != NONE]
    if not calib_inputs:
        raise DiffspeedError("layer_sensitivity needs calibration inputs; record some with capture_calib_inputs(loaded, seeds=[...])")
    if not candidates:
        raise DiffspeedError("layer_sensitivity needs at least one candidate format, e.g. ['int8_w8a8', 'int4_weight_only']")
    originals = {fqn: _linear(model, fqn) for fqn in layer_fqns}
    refs = _run_all(model, calib_inputs)
    result: dict[str, dict[str, float]] = {}
    bar, task = _progress(progress, len(originals) * len(candidates), "layer sensitivity")
    try:
        for fqn, original in originals.items():
            row = {NONE: 0.0}
            for fmt in candidates:
                if bar is not None:
                    bar.update(task, description=f"{fqn} -> {fmt}")
                _set(model, fqn, quantize_fn(copy.deepcopy(original), fmt))
                try:
                    outs = _run_all(model, calib_inputs)
                finally:
                    _set(model, fqn, original)
                mse = sum(float((o - r).pow(2).mean()) for o, r in zip(outs, refs)) / len(refs)
                row[fmt] = mse if math.isfinite(mse) else float("inf")
                if bar is not None:
                    bar.advance(task)
            result[fqn] = row
    finally:
        if bar is not None:
            bar.stop()
    return result


def measure_layer_bytes(
    model: nn.Module,
    layer_fqns: Sequence[str],
    candidates: Sequence[str],
    quantize_fn: QuantizeFn | None = None,
    nbytes_fn: NbytesFn | None = None,
) -> dict[str, dict[str, int]]:
    """``{fqn: {fmt: bytes}}`` measured by ``nbytes_fn`` on the real quantized modules (``"none"``: the float layer)."""
    quantize_fn = quantize_fn or default_quantize_fn
    nbytes_fn = nbytes_fn or default_nbytes_fn
    out: dict[str, dict[str, int]] = {}
    for fqn in layer_fqns:
        lin = _linear(model, fqn)
        row = {NONE: int(nbytes_fn(lin))}
        for fmt in candidates:
            if fmt != NONE:
                row[fmt] = int(nbytes_fn(quantize_fn(copy.deepcopy(lin), fmt)))
        out[fqn] = row
    return out


# ---- the plan -------------------------------------------------------------------------------------
@dataclass
class MixedPrecisionPlan:
    """``formats``: ``{fqn: fmt or "none"}``; predicted total bytes / loss (sum of single-layer MSEs) / latency."""

    formats: dict[str, str]
    predicted_bytes: int
    predicted_loss: float
    predicted_latency: float | None = None
    budget: dict[str, Any] = field(default_factory=dict)

    @property
    def predicted_mb(self) -> float:
        return self.predicted_bytes / 1e6

    @property
    def quantized_layers(self) -> list[str]:
        return [f for f, fmt in self.formats.items() if fmt != NONE]

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "formats": dict(self.formats), "predicted_bytes": int(self.predicted_bytes),
                "predicted_loss": float(self.predicted_loss), "predicted_latency": self.predicted_latency,
                "budget": dict(self.budget)}

    @classmethod
    def from_dict(cls, data: Any, source: str = "<in-memory plan>") -> "MixedPrecisionPlan":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise DiffspeedError(f"mixed-precision plan {source} has format {got!r}, expected {FORMAT!r}; "
                                 "recreate it with assign_bits(...).save(path)")
        formats = data.get("formats")
        if not isinstance(formats, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in formats.items()):
            raise DiffspeedError(f"mixed-precision plan {source}: 'formats' must map layer names to format names")
        return cls(formats=dict(formats), predicted_bytes=int(data.get("predicted_bytes", 0)),
                   predicted_loss=float(data.get("predicted_loss", 0.0)),
                   predicted_latency=data.get("predicted_latency"), budget=dict(data.get("budget") or {}))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MixedPrecisionPlan":
        p = Path(path)
        if not p.is_file():
            raise DiffspeedError(f"mixed-precision plan {path} does not exist; create it with assign_bits(...).save(path)")
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DiffspeedError(f"cannot read mixed-precision plan {path} ({exc}); recreate it") from None
        return cls.from_dict(data, os.fspath(path))


def assign_bits(
    sensitivity: Mapping[str, Mapping[str, float]],
    layer_bytes: Mapping[str, Mapping[str, int]],
    *,
    budget_mb: float | None = None,
    budget_latency: float | None = None,
    latency: Mapping[str, Mapping[str, float]] | None = None,
    fixed_bytes: int = 0,
) -> MixedPrecisionPlan:
    """Greedy bit assignment: the cheapest loss per byte (or per ms) saved first, until the budget holds.

    ``budget_mb``: total weight megabytes (1e6 bytes) of the planned layers plus ``fixed_bytes`` (the
    rest of the model, if the budget is for the whole model). ``budget_latency``: total ms of the
    planned layers, with ``latency[fqn][fmt]`` estimates (``"none"`` included). Exactly one budget.
    Raises :class:`DiffspeedError` naming the smallest reachable size/latency when the budget cannot be met.
    """
    if (budget_mb is None) == (budget_latency is None):
        raise DiffspeedError("assign_bits needs exactly one budget: budget_mb=... or budget_latency=... (with latency=...)")
    by_latency = budget_latency is not None
    if by_latency and latency is None:
        raise DiffspeedError("budget_latency needs per-layer latency estimates: latency={fqn: {fmt: ms}}")
    layers = list(sensitivity)
    for fqn in layers:
        if fqn not in layer_bytes or NONE not in layer_bytes[fqn]:
            raise DiffspeedError(f"layer_bytes has no entry for {fqn!r} (with a 'none' size); measure it with measure_layer_bytes")
        if by_latency and (fqn not in latency or NONE not in latency[fqn]):  # type: ignore[operator]
            raise DiffspeedError(f"latency has no entry for {fqn!r} (with a 'none' time)")

    def fmts(fqn: str) -> list[str]:
        table = latency[fqn] if by_latency else layer_bytes[fqn]  # type: ignore[index]
        return [f for f in sensitivity[fqn] if f in table and (f == NONE or math.isfinite(sensitivity[fqn][f]))]

    cost_of = (lambda f, m: float(latency[f][m])) if by_latency else (lambda f, m: float(layer_bytes[f][m]))  # type: ignore[index]
    loss_of = lambda f, m: float(sensitivity[f][m]) if m != NONE else 0.0  # noqa: E731
    budget = float(budget_latency) if by_latency else float(budget_mb) * 1e6 - fixed_bytes  # type: ignore[arg-type]
    unit = "ms" if by_latency else "MB"

    lowest = sum(min(cost_of(f, m) for m in fmts(f)) for f in layers)
    if lowest > budget + 1e-9:
        if by_latency:
            raise DiffspeedError(f"latency budget {budget_latency} ms is unreachable: with every layer at its fastest "
                                 f"format the layers take {lowest:.4g} ms; raise budget_latency to at least that")
        reach = (lowest + fixed_bytes) / 1e6
        raise DiffspeedError(f"size budget {budget_mb} MB is unreachable: the smallest reachable size, every layer at "
                             f"its lowest format, is {reach:.6g} MB; raise budget_mb to at least that")

    current = {f: NONE for f in layers}
    total = sum(cost_of(f, NONE) for f in layers)
    while total > budget + 1e-9:
        best: tuple[float, float, str, str] | None = None
        for f in layers:
            cur = current[f]
            for m in fmts(f):
                saved = cost_of(f, cur) - cost_of(f, m)
                if saved <= 0:
                    continue
                rate = max(loss_of(f, m) - loss_of(f, cur), 0.0) / saved
                key = (rate, -saved, f, m)
                if best is None or key < best:
                    best = key
        if best is None:  # cannot happen when lowest <= budget; kept as a guard
            raise DiffspeedError(f"cannot meet the {unit} budget; raise it")
        _, neg_saved, f, m = best
        current[f] = m
        total += neg_saved

    size = sum(float(layer_bytes[f][current[f]]) for f in layers if current[f] in layer_bytes[f]) + fixed_bytes
    lat = sum(float(latency[f][current[f]]) for f in layers) if latency is not None and all(
        current[f] in latency.get(f, {}) for f in layers) else None
    return MixedPrecisionPlan(
        formats=current, predicted_bytes=int(size), predicted_loss=sum(loss_of(f, current[f]) for f in layers),
        predicted_latency=lat,
        budget={"budget_mb": budget_mb, "budget_latency": budget_latency, "fixed_bytes": int(fixed_bytes)},
    )


def apply_plan_(model: nn.Module, plan: MixedPrecisionPlan, quantize_fn: QuantizeFn | None = None) -> nn.Module:
    """Swap every planned layer for its quantized module, in place (reload the model to undo)."""
    quantize_fn = quantize_fn or default_quantize_fn
    todo = {fqn: fmt for fqn, fmt in plan.formats.items() if fmt != NONE}
    linears = {fqn: _linear(model, fqn) for fqn in todo}  # validate every name before changing anything
    for fqn, fmt in todo.items():
        _set(model, fqn, quantize_fn(linears[fqn], fmt))
    return model
