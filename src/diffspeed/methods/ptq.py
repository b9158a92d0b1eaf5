"""ptq_: post-training quantization of the linear layers onto diffspeed's own low-bit kernels (in place).

Unlike ``quantize_`` (torchao tensor subclasses), ``ptq_`` replaces each selected ``nn.Linear`` by a
:class:`~diffspeed.quant.formats.QuantLinear` whose forward runs one low-precision op of torch
(``torch._int_mm``, ``torch._scaled_mm``, ``torch._weight_int8pack_mm``, the int4pack mm), with:

* ``act="static"``: per-timestep-group activation scales from calibration stats
  (:mod:`diffspeed.quant.calibration`), picked from the StepContext without host syncs;
* ``smooth_alpha``: SmoothQuant factors from the same stats (:mod:`diffspeed.quant.smoothquant`).

Layer selection is ``quantize_``'s (:func:`~diffspeed.methods.quantize.select_layers`): embeddings,
adaLN modulation and final layers stay in float by default; ``include``/``exclude`` regexes. Layers
whose shape the format's kernel cannot take are skipped with the reason.

The model is rewritten in place: ``remove()`` raises; reload the model. :func:`save_ptq` /
:func:`load_ptq_` store and restore a quantized model without pickle (safetensors + JSON sidecar).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from ..adapters.base import ModelAdapter
from ..errors import AlreadyAppliedError, DiffspeedError, WeightFileError
from ..quant.formats import (
    FORMATS,
    INT4_GROUP_SIZES,
    INT4_KERNELS,
    W8A8_FORMATS,
    QuantLinear,
    attach_step_group,
    quantize_linear,
    unavailable_reasons,
    weight_nbytes,
)
from ._validate import require_bool, require_patterns
from .base import MethodConfig, MethodHandle, Stage, _applied, register_method
from .quantize import _finish as _finish_quantized
from .quantize import _is_quantized, _load_into, _raise_problems, _unapplied, model_nbytes, select_layers

PTQ_FORMAT_VERSION = 1
WEIGHTS_FILE = "ptq.safetensors"
CONFIG_FILE = "ptq_config.json"


@dataclass(frozen=True)
class PTQConfig(MethodConfig):
    """Quantize the transformer's linears in place onto low-bit kernels.

    format: "int8_w8a8" | "fp8_w8a8" | "int8_weight_only" | "int4_weight_only".
    act: "dynamic" (per-token scales at run time) or "static" (per-timestep-group scales from
        ``calibration``; w8a8 formats only).
    calibration: path of an ActivationStats file (``calibrate(...).save(path)``); needed by
        ``act="static"`` and ``smooth_alpha``.
    smooth_alpha: SmoothQuant migration strength in [0, 1], or None for no smoothing (w8a8 only).
    include / exclude / skip_sensitive: layer selection, as for ``quantize_``.
    group_size: int4 group size (32, 64, 128 or 256).
    int4_kernel: "auto" (= dequant), "tinygemm" (torch's int4pack mm: a
        small-M kernel, for few tokens) or "dequant" (int4 storage dequantized per call for a float
        GEMM: memory saved at about float speed; not a low-bit GEMM).
    gptq: round the weights with GPTQ's error feedback instead of to nearest (int4 / int8 formats).
        It needs each layer's input second moment over the denoising trajectory, which a bare
        ``apply`` cannot collect: use :func:`diffspeed.methods.ptq.ptq_gptq_` (or ``diffspeed quantize
        --gptq``), which calibrates and quantizes; the saved checkpoint then loads like any other.
    gptq_damp: GPTQ's dampening, a fraction of the mean diagonal of the second moment added to it.
    quantize_embeddings: also store every ``nn.Embedding`` table (e.g. DiT's per-block class-label
        tables) as int8 rows with a per-row scale (:mod:`diffspeed.quant.embedding`); ``exclude``
        patterns apply. Off by default; with int4 linears it is what brings DiT-XL/2's whole
        transformer past 3.5x smaller than bf16.
    fuse_gelu: (dynamic fp8) run each FFN's tanh GELU inside the next layer's one-pass activation
        quantization kernel instead of as its own pass over the 4x-wide hidden activations
        (:mod:`diffspeed.quant.act_fusion`); exact up to the bf16 rounding of the GELU output it skips.
    """

    method: ClassVar[str] = "ptq_"
    stage: ClassVar[Stage] = Stage.WEIGHTS
    in_place: ClassVar[bool] = True
    incompatible: ClassVar[dict[str, str]] = {
        "quantize_": "quantize_ and ptq_ both quantize the linear layers; use one of them",
    }

    format: str = "int8_w8a8"
    act: str = "dynamic"
    calibration: str | None = None
    smooth_alpha: float | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    skip_sensitive: bool = True
    group_size: int = 128
    int4_kernel: str = "auto"
    gptq: bool = False
    gptq_damp: float = 0.01
    fuse_gelu: bool = True
    quantize_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DiffspeedError(f"ptq_ format must be one of {', '.join(FORMATS)}; got {self.format!r}")
        if self.act not in ("dynamic", "static"):
            raise DiffspeedError(f"ptq_ act must be 'dynamic' or 'static'; got {self.act!r}")
        if self.act == "static" and self.format not in W8A8_FORMATS:
            raise DiffspeedError(f"ptq_ act='static' quantizes activations, which only the w8a8 formats do "
                                 f"({', '.join(W8A8_FORMATS)}); use act='dynamic' with {self.format}")
        if self.calibration is not None and (not isinstance(self.calibration, str) or not self.calibration):
            raise DiffspeedError(f"ptq_ calibration must be the path of a stats file or null; got {self.calibration!r}")
        if self.smooth_alpha is not None:
            if isinstance(self.smooth_alpha, bool) or not isinstance(self.smooth_alpha, (int, float)) \
                    or not 0.0 <= float(self.smooth_alpha) <= 1.0:
                raise DiffspeedError(f"ptq_ smooth_alpha must be a number in [0, 1] (0.5 is typical) or null for "
                                     f"no smoothing; got {self.smooth_alpha!r}")
            if self.format not in W8A8_FORMATS:
                raise DiffspeedError(f"ptq_ smooth_alpha only helps the w8a8 formats ({', '.join(W8A8_FORMATS)}); "
                                     f"set it to null for {self.format}")
        needs = [n for n, on in (("act='static'", self.act == "static"), ("smooth_alpha", self.smooth_alpha is not None)) if on]
        if needs and self.calibration is None:
            raise DiffspeedError(
                f"ptq_ {' and '.join(needs)} need activation statistics: set calibration to a stats file made by "
                "diffspeed.quant.calibration.calibrate(loaded, seeds=..., labels=..., steps=...).save(path)"
            )
        for name in ("include", "exclude"):
            require_patterns("ptq_", name, getattr(self, name))
        require_bool("ptq_", "skip_sensitive", self.skip_sensitive)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
            raise DiffspeedError(f"ptq_ group_size must be a positive integer, got {self.group_size!r}")
        if self.format == "int4_weight_only" and self.group_size not in INT4_GROUP_SIZES:
            raise DiffspeedError(f"ptq_ int4 group_size must be one of {INT4_GROUP_SIZES}; got {self.group_size}")
        require_bool("ptq_", "gptq", self.gptq)
        if self.gptq and self.format == "fp8_w8a8":
            raise DiffspeedError("ptq_ gptq rounds onto the int4 / int8 grids; fp8_w8a8 is not supported, set gptq=false")
        if isinstance(self.gptq_damp, bool) or not isinstance(self.gptq_damp, (int, float)) \
                or not 0.0 < float(self.gptq_damp) <= 1.0:
            raise DiffspeedError(f"ptq_ gptq_damp must be a number in (0, 1] (0.01 is typical), got {self.gptq_damp!r}")
        require_bool("ptq_", "fuse_gelu", self.fuse_gelu)
        require_bool("ptq_", "quantize_embeddings", self.quantize_embeddings)
        if self.int4_kernel not in INT4_KERNELS:
            raise DiffspeedError(f"ptq_ int4_kernel must be one of {', '.join(INT4_KERNELS)}; got {self.int4_kernel!r}")


@dataclass
class PTQReport:
    """What :func:`ptq_model_` did. Byte counts: the model's parameters and buffers."""

    format: str
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    kernels: dict[str, str] = field(default_factory=dict)  # fqn -> op that runs
    fused_gelu: list[str] = field(default_factory=list)  # GELUs moved into the next fp8 layer
    embeddings: list[str] = field(default_factory=list)  # embedding tables stored as int8 rows
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    quantized_bytes_before: int = 0  # weight storage of the quantized layers only
    quantized_bytes_after: int = 0
    handle: MethodHandle | None = None


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _set_module(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent, _, name = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _install(model: nn.Module, fqn: str, lin: nn.Linear, ql: QuantLinear, ctx: Any, report: PTQReport) -> QuantLinear:
    """Put ``ql`` in place of the linear ``lin`` at ``fqn``, attached to ``ctx``; count it in ``report``."""
    ql.attach_context(ctx)
    report.quantized_bytes_before += weight_nbytes(lin)
    report.quantized_bytes_after += weight_nbytes(ql)
    report.kernels[fqn] = ql.kernel
    _set_module(model, fqn, ql)
    return ql


def _select(model: nn.Module, config: PTQConfig,
            filter_fn: Callable[[nn.Module, str], bool] | None) -> tuple[list[str], dict[str, str]]:
    # quantize_'s selection, without its torchao-specific int4 rule (our kernels check shapes below)
    shim = SimpleNamespace(include=config.include, exclude=config.exclude, skip_sensitive=config.skip_sensitive,
                           backend=None)
    fqns, skipped = select_layers(model, shim, filter_fn)  # type: ignore[arg-type]
    device = _device(model)
    chosen = []
    for f in fqns:
        m = model.get_submodule(f)
        reasons = unavailable_reasons(config.format, device, in_features=m.in_features, out_features=m.out_features,
                                      group_size=config.group_size, act=config.act, int4_kernel=config.int4_kernel)
        if reasons:
            skipped[f] = "; ".join(reasons)
        else:
            chosen.append(f)
    return chosen, skipped


def _quantize(model: nn.Module, config: PTQConfig, fqns: list[str], skipped: dict[str, str],
              stats: Any, hessians: dict[str, torch.Tensor] | None = None) -> PTQReport:
    from ..context import get_context
    from ..quant.smoothquant import smooth_factors

    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise AlreadyAppliedError("ptq_: the model already has quantized linears; reload it to quantize it again")
    already = [f for f, m in model.named_modules() if isinstance(m, nn.Linear) and _is_quantized(m.weight)]
    if already:
        raise AlreadyAppliedError(f"ptq_: {already[0]!r} is already quantized by quantize_; reload the model")
    device = _device(model)
    general = unavailable_reasons(config.format, device, group_size=config.group_size, act=config.act,
                                  int4_kernel=config.int4_kernel)
    if general:
        raise DiffspeedError(f"ptq_ format {config.format!r} is unavailable on {device.type}: " + "; ".join(general))
    if not fqns:
        why = "; ".join(sorted({r for r in skipped.values()}))[:400]
        raise DiffspeedError(f"ptq_ selected no layer to quantize (include/exclude/skip_sensitive/filter, or shapes): {why}")
    if (config.act == "static" or config.smooth_alpha is not None) and stats is None:
        raise DiffspeedError("ptq_ act='static' / smooth_alpha need calibration stats; set calibration")
    if stats is not None:
        stats.check_model(model)
        missing = [f for f in fqns if f not in stats.layers]
        if missing and (config.act == "static" or config.smooth_alpha is not None):
            raise DiffspeedError(f"the calibration stats have no entry for layer {missing[0]!r} "
                                 f"(and {len(missing) - 1} more); recalibrate with layers=None")
    if config.gptq:
        missing = [f for f in fqns if hessians is None or f not in hessians]
        if missing:
            raise DiffspeedError(
                f"ptq_ gptq=true needs each layer's input second moment (missing for {missing[0]!r}): use "
                "diffspeed.methods.ptq.ptq_gptq_(loaded, config, seeds=..., labels=..., num_steps=...) or "
                "`diffspeed quantize --gptq`, which calibrate and quantize in one go")
    # only static scales follow the step: dynamic / weight-only layers need no StepContext, whose
    # auto-mode pre-hook reads the timestep on the host (a sync and, compiled, a graph break)
    ctx = get_context(model) if config.act == "static" else None  # static is w8a8-only (PTQConfig checks)
    report = PTQReport(config.format, skipped=dict(skipped))
    report.weight_bytes_before = model_nbytes(model)
    qmax = 127.0 if config.format == "int8_w8a8" else 448.0
    new: list[QuantLinear] = []
    for f in fqns:
        lin = model.get_submodule(f)
        smooth = act_scales = None
        if config.smooth_alpha is not None:
            smooth = smooth_factors(stats.chan_absmax(f), lin.weight, config.smooth_alpha)
        if config.act == "static":
            act_scales = (stats.group_absmax(f, smooth).clamp_min(1e-6) / qmax)
        ql = quantize_linear(lin, config.format, act=config.act, act_scales=act_scales, smooth=smooth,
                             group_size=config.group_size, int4_kernel=config.int4_kernel,
                             hessian=hessians[f] if config.gptq else None, gptq_damp=config.gptq_damp)
        new.append(_install(model, f, lin, ql, ctx, report))
    attach_step_group(model, new, ctx)
    _maybe_fuse_gelu(model, config, report)
    if config.quantize_embeddings:
        _quantize_embeddings(model, config, report)
    report.quantized = list(fqns)
    report.weight_bytes_after = model_nbytes(model)
    return report


def _quantize_embeddings(model: nn.Module, config: PTQConfig, report: PTQReport) -> None:
    import re

    from ..quant.embedding import embedding_unsupported, quantize_embedding

    for f, m in list(model.named_modules()):
        if not f or not isinstance(m, nn.Embedding):
            continue
        if any(re.search(p, f) for p in config.exclude):
            report.skipped[f] = "excluded by pattern"
        elif (why := embedding_unsupported(m)) is not None:
            report.skipped[f] = f"embedding: {why}"
        else:
            qe = quantize_embedding(m)
            report.quantized_bytes_before += weight_nbytes(m)
            report.quantized_bytes_after += weight_nbytes(qe)
            report.kernels[f] = "int8 row lookup"
            _set_module(model, f, qe)
            report.embeddings.append(f)


def _maybe_fuse_gelu(model: nn.Module, config: PTQConfig, report: PTQReport) -> None:
    if config.fuse_gelu and config.format == "fp8_w8a8" and config.act == "dynamic":
        from ..quant.act_fusion import fuse_gelu_into_fp8_

        report.fused_gelu = fuse_gelu_into_fp8_(model)


def _finish(model: nn.Module, config: PTQConfig, report: PTQReport) -> MethodHandle:
    handle = _finish_quantized(model, config, report)
    handle.stats["kernels"] = ", ".join(sorted(set(report.kernels.values())))
    handle.stats["fused_gelu"] = len(report.fused_gelu)
    return handle


def _load_stats(config: PTQConfig) -> Any:
    if config.calibration is None:
        return None
    from ..quant.calibration import ActivationStats

    return ActivationStats.load(config.calibration)


def ptq_model_(model: nn.Module, config: PTQConfig | None = None, stats: Any = None,
               filter_fn: Callable[[nn.Module, str], bool] | None = None,
               hessians: dict[str, torch.Tensor] | None = None) -> PTQReport:
    """Quantize ``model``'s linears in place; returns a report (``report.handle`` is the method handle).

    ``stats`` (an ActivationStats) is used instead of reading ``config.calibration`` from disk.
    ``filter_fn(module, fqn) -> bool`` replaces the sensitive-layer rule (include/exclude still apply).
    ``hessians`` (``{fqn: E[x x^T]}``, see :mod:`diffspeed.quant.gptq`): needed by ``config.gptq``.
    """
    config = config or PTQConfig()
    applied = _unapplied(model, config)
    if stats is None:
        stats = _load_stats(config)
    fqns, skipped = _select(model, config, filter_fn)
    report = _quantize(model, config, fqns, skipped, stats, hessians)
    applied[config.method] = _finish(model, config, report)
    return report


def ptq_gptq_(loaded: Any, config: PTQConfig, *, seeds: Sequence[int], labels: Sequence[Any], num_steps: int,
              guidance_scale: float | None = None, stats: Any = None,
              filter_fn: Callable[[nn.Module, str], bool] | None = None, progress: bool = False) -> PTQReport:
    """``ptq_`` with GPTQ rounding: run the float model through ``num_steps``-step generations of
    ``seeds``/``labels`` to collect each selected layer's input second moment over the whole denoising
    trajectory, then quantize in place (``config.gptq`` must be true)."""
    from ..quant.gptq import calibrate_hessians

    if not config.gptq:
        raise DiffspeedError("ptq_gptq_ needs a PTQConfig with gptq=True")
    model = loaded.transformer
    _unapplied(model, config)
    fqns, _ = _select(model, config, filter_fn)
    if not fqns:
        raise DiffspeedError("ptq_gptq_: the layer selection is empty; nothing to calibrate")
    hessians = calibrate_hessians(loaded, fqns, seeds=seeds, labels=labels, num_steps=num_steps,
                                  guidance_scale=guidance_scale, progress=progress)
    return ptq_model_(model, config, stats=stats, filter_fn=filter_fn, hessians=hessians)


@register_method(PTQConfig)
def apply_ptq(model: nn.Module, config: PTQConfig, adapter: ModelAdapter) -> MethodHandle:
    stats = _load_stats(config)
    fqns, skipped = _select(model, config, None)
    return _finish(model, config, _quantize(model, config, fqns, skipped, stats))


# ---- save / load without pickle --------------------------------------------------------------------

def save_ptq(model: nn.Module, path: str | Path) -> Path:
    """Write a ptq_-quantized model to directory ``path``: ``ptq.safetensors`` (every parameter and
    buffer, quantized ones as stored) and ``ptq_config.json`` (config, per-layer layout). No pickle."""
    from safetensors.torch import save_file

    handle = _applied(model).get(PTQConfig.method)
    if handle is None:
        raise DiffspeedError("save_ptq: this model was not quantized with diffspeed's ptq_")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().clone().cpu()
               for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    from ..quant.embedding import QuantEmbedding

    layers = {}
    for f, m in model.named_modules():
        if isinstance(m, QuantEmbedding):
            layers[f] = {"format": m.fmt, "num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim}
        elif isinstance(m, QuantLinear):
            layers[f] = {"format": m.fmt, "act": m.act, "group_size": m.group_size, "kernel": m.kernel,
                         "int4_layout": m.int4_layout, "in_features": m.in_features, "out_features": m.out_features,
                         "smooth": m.smooth is not None, "bias": m.bias is not None, "input_gelu": m.input_gelu,
                         "act_groups": 0 if m.act_scale is None else int(m.act_scale.numel()) - 1}
    meta = {"diffspeed_ptq": PTQ_FORMAT_VERSION, "config": handle.config.to_dict(), "layers": layers,
            "model_class": type(getattr(model, "_orig_mod", model)).__name__, "torch_version": torch.__version__}
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_ptq_(model: nn.Module, path: str | Path) -> PTQReport:
    """Quantize a freshly loaded ``model`` (same architecture) the way the saved one was, then load the
    saved tensors into it; outputs are bit-identical to the saved model's. Raises WeightFileError with
    the reason on a corrupt or mismatched checkpoint."""
    from safetensors.torch import load_file

    from .base import config_from_dict

    src = Path(path)
    if not (src / CONFIG_FILE).is_file() or not (src / WEIGHTS_FILE).is_file():
        raise WeightFileError(f"{src} is not a ptq_ checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads((src / CONFIG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise WeightFileError(f"{src / CONFIG_FILE} is not valid JSON: {exc.msg}") from None
    if not isinstance(meta, dict) or meta.get("diffspeed_ptq") != PTQ_FORMAT_VERSION:
        raise WeightFileError(f"{src}: not a ptq_ checkpoint of format {PTQ_FORMAT_VERSION}")
    name = type(getattr(model, "_orig_mod", model)).__name__
    if meta.get("model_class") != name:
        raise WeightFileError(f"{src} was saved from a {meta.get('model_class')}, not a {name}")
    try:
        config = config_from_dict(meta["config"])
        layers = dict(meta["layers"])
    except (KeyError, TypeError, DiffspeedError) as exc:
        raise WeightFileError(f"{src}: bad ptq_ config: {exc}") from None
    if not isinstance(config, PTQConfig):
        raise WeightFileError(f"{src}: the config is for {config.method}, not ptq_")
    applied = _applied(model)
    if config.method in applied:
        raise AlreadyAppliedError("load_ptq_ needs an unquantized model; reload it first")
    device = _device(model)
    problems: list[str] = []
    for f, info in layers.items():
        try:
            m = model.get_submodule(f)
        except AttributeError:
            m = None
        if info.get("format") == "int8_embedding":
            if not isinstance(m, nn.Embedding):
                problems.append(f"the model has no embedding {f!r}")
            elif (m.num_embeddings, m.embedding_dim) != (info.get("num_embeddings"), info.get("embedding_dim")):
                problems.append(f"{f}: saved a {info.get('num_embeddings')}x{info.get('embedding_dim')} table, model "
                                f"{m.num_embeddings}x{m.embedding_dim}")
        elif not isinstance(m, nn.Linear):
            problems.append(f"the model has no linear layer {f!r}")
        elif (m.in_features, m.out_features) != (info["in_features"], info["out_features"]):
            problems.append(f"{f}: saved {info['in_features']}->{info['out_features']}, model "
                            f"{m.in_features}->{m.out_features}")
        elif info.get("int4_layout") not in (None, "", "dequant") and info["int4_layout"] != device.type:
            problems.append(f"{f}: int4 weights packed for {info['int4_layout']}, the model is on {device.type}")
    if problems:
        raise WeightFileError(f"{src} does not match the model: " + "; ".join(problems[:5]))
    try:
        state = load_file(str(src / WEIGHTS_FILE))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise WeightFileError(f"{src / WEIGHTS_FILE} is corrupt or truncated: {exc}") from None
    # rebuild the same modules (placeholder scales / factors, overwritten below)
    from ..context import get_context

    ctx = get_context(model) if any(info.get("act") == "static" for info in layers.values()) else None
    report = PTQReport(config.format)
    report.weight_bytes_before = model_nbytes(model)
    new: list[QuantLinear] = []
    from ..quant.embedding import quantize_embedding

    for f, info in layers.items():
        lin = model.get_submodule(f)
        if info.get("format") == "int8_embedding":
            _set_module(model, f, quantize_embedding(lin))
            report.embeddings.append(f)
            continue
        act_scales = torch.ones(info["act_groups"]) if info["act"] == "static" else None
        smooth = torch.ones(lin.in_features) if info["smooth"] else None
        int4_kernel = "dequant" if info.get("int4_layout") == "dequant" else (
            "tinygemm" if info.get("int4_layout") else "auto")
        ql = quantize_linear(lin, info["format"], act=info["act"] if info["act"] != "none" else "dynamic",
                             act_scales=act_scales, smooth=smooth, group_size=info["group_size"], int4_kernel=int4_kernel)
        new.append(_install(model, f, lin, ql, ctx, report))
    report.quantized = [f for f in layers if f not in report.embeddings]
    with torch.no_grad():
        _load_into(state, list(model.named_parameters()) + list(model.named_buffers()), problems)
    _raise_problems(src, problems, state, "; the model's linears are now partly replaced: reload it")
    attach_step_group(model, new, ctx)
    _maybe_fuse_gelu(model, config, report)
    for f, info in layers.items():
        if f in report.embeddings:
            continue
        got = model.get_submodule(f).input_gelu
        if info.get("input_gelu", got) != got:  # checkpoints from before the fusion carry no entry
            raise WeightFileError(f"{src}: layer {f!r} was saved with input_gelu={info['input_gelu']!r} but the "
                                  f"model's structure gives {got!r}; the model's FFN differs from the saved one")
    report.weight_bytes_after = model_nbytes(model)
    applied[config.method] = _finish(model, config, report)
    return report


__all__ = ["PTQConfig", "PTQReport", "load_ptq_", "ptq_gptq_", "ptq_model_", "save_ptq"]
