"""Low-bit weights through torchao, applied to the transformer's linear layers (in place).

``quantize_`` swaps the weights of selected ``nn.Linear`` layers for torchao tensor subclasses:

* ``int8_weight_only``: int8 weights with per-row scales, activations stay in float (works on CPU);
* ``int8_dynamic``: int8 weights and per-token dynamically quantized int8 activations (runs on CPU,
  slow there in eager mode; meant for GPU + torch.compile);
* ``fp8_dynamic_row``: float8 e4m3 weights and activations, row-wise scales (CUDA sm89+ only);
* ``int4_weight_only``: int4 weights in groups of 128 (torchao's int4 kernels: CUDA and, for torchao
  0.18, the kernel package ``mslk``).

Which layers: every ``nn.Linear`` except, when ``skip_sensitive`` (the default), the layers that are
small and precision-critical, so quantizing them saves almost no memory and costs the most quality
(see :data:`SENSITIVE_PATTERNS`):

* embeddings (patch / position / timestep / guidance / text / caption embedders): they run once per
  step on tiny inputs, and the timestep embedding steers every block;
* adaLN modulation linears (``norm1.linear``, ``norm1_context.linear``, ``norm.linear``,
  ``adaln_single``, Wan's ``time_proj``): their outputs scale and shift every normalised activation,
  so a rounding error there is multiplied through the whole block;
* the final layers (top-level ``proj_out`` / ``proj_out_1`` / ``proj_out_2``, ``norm_out``): they
  write the predicted noise directly (Flux's ``single_transformer_blocks.N.proj_out`` is *not* final
  and is quantized).

``exclude`` regexes (``re.search`` on the module's fully qualified name) always win; ``include``
regexes force a layer in (over the sensitive rule); a python ``filter_fn(module, fqn) -> bool``
given to :func:`quantize_model_` replaces the sensitive rule for the layers neither list names.

The weights are rewritten in place: ``remove()`` raises, reload the model instead. Quantized models
are saved without pickle by :func:`save_quantized` (safetensors of the subclass' inner tensors +
a JSON sidecar) and restored onto a freshly loaded model by :func:`load_quantized_`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch
from torch import nn

from ..adapters.base import ModelAdapter
from ..errors import AlreadyAppliedError, DiffspeedError, WeightFileError
from ._validate import require_bool, require_patterns
from .base import MethodConfig, MethodHandle, Stage, _applied, register_method

BACKENDS: tuple[str, ...] = ("int8_weight_only", "int8_dynamic", "fp8_dynamic_row", "int4_weight_only")
INT4_GROUP_SIZE = 128
FORMAT_VERSION = 1
WEIGHTS_FILE = "quantized.safetensors"
CONFIG_FILE = "quantize_config.json"

# (reason, regex searched in the fqn); the first match names the reason. Covers DiT, PixArt, SD3,
# Flux, Wan and CogVideoX as laid out by diffusers 0.42.
SENSITIVE_PATTERNS: tuple[tuple[str, str], ...] = (
    ("embedding", r"(^|\.)(time_text_embed|condition_embedder|time_embedding|adaln_single|patch_embed|pos_embed"
                  r"|caption_projection|context_embedder|x_embedder|class_embedder)(\.|$)"),
    ("embedding", r"(^|\.)(\w*_embedder|emb|embed|embedding)(\.|$)"),
    ("adaLN modulation", r"(^|\.)norm\w*\.linear$"),
    ("adaLN modulation", r"(^|\.)(time_proj|scale_shift_table)$"),
    ("final layer", r"^(proj_out(_\d+)?|norm_out)(\.|$)"),
)


@dataclass(frozen=True)
class QuantizeConfig(MethodConfig):
    """Quantize the transformer's linear weights in place with a torchao backend.

    backend: "int8_weight_only" | "int8_dynamic" | "fp8_dynamic_row" | "int4_weight_only".
    include: fqn regexes forced in (over the sensitive-layer rule; ``exclude`` still wins).
    exclude: fqn regexes never quantized.
    skip_sensitive: keep embeddings, adaLN modulation and the final layers in float (recommended).
    """

    method: ClassVar[str] = "quantize_"
    stage: ClassVar[Stage] = Stage.WEIGHTS
    in_place: ClassVar[bool] = True
    compile_note: ClassVar[str] = ""

    backend: str = "int8_weight_only"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    skip_sensitive: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise DiffspeedError(f"quantize_ backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        for name in ("include", "exclude"):
            require_patterns("quantize_", name, getattr(self, name))
        require_bool("quantize_", "skip_sensitive", self.skip_sensitive)


@dataclass
class QuantizeReport:
    """What :func:`quantize_model_` did. Byte counts are over all parameters of the model."""

    backend: str
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # fqn -> reason (nn.Linear layers only)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    quantized_bytes_before: int = 0  # the quantized layers' weights only
    quantized_bytes_after: int = 0
    handle: MethodHandle | None = None


# ---- availability --------------------------------------------------------------------------------

def _torchao_version() -> str | None:
    try:
        import torchao
    except Exception:  # noqa: BLE001 - any import failure means unusable
        return None
    return str(getattr(torchao, "__version__", "unknown"))


def backend_unavailable_reasons(backend: str, device: str | torch.device = "cpu") -> list[str]:
    """Why ``backend`` cannot run on ``device`` here; an empty list means it can."""
    if backend not in BACKENDS:
        return [f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}"]
    device = torch.device(device)
    reasons: list[str] = []
    version = _torchao_version()
    if version is None:
        reasons.append("torchao is not installed or fails to import (pip install torchao)")
    if backend == "fp8_dynamic_row":
        if device.type != "cuda":
            reasons.append(f"fp8 needs a CUDA GPU with compute capability >= 8.9 (sm89+); the model is on {device.type}")
        elif not torch.cuda.is_available():
            reasons.append("fp8 needs CUDA, but torch.cuda.is_available() is False")
        else:
            cap = torch.cuda.get_device_capability(device)
            if cap < (8, 9):
                reasons.append(f"fp8 needs compute capability >= 8.9 (sm89+), this GPU is sm{cap[0]}{cap[1]}")
    elif backend == "int4_weight_only":
        if device.type != "cuda":
            reasons.append(f"torchao's int4 weight-only kernels need a CUDA GPU; the model is on {device.type}")
        if version is not None and importlib.util.find_spec("mslk") is None:
            reasons.append(f"torchao {version} int4 weight-only needs the kernel package mslk>=1.0, which is not installed")
    return reasons


def _torchao_config(backend: str) -> Any:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    if backend == "int8_weight_only":
        return Int8WeightOnlyConfig()
    if backend == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if backend == "fp8_dynamic_row":
        from torchao.quantization import PerRow

        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    return Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE)


# ---- selection -----------------------------------------------------------------------------------

def _is_quantized(t: torch.Tensor) -> bool:
    return type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__")


def _inner(t: torch.Tensor) -> dict[str, torch.Tensor]:
    names = t.__tensor_flatten__()[0]
    return {n: getattr(t, n) for n in names if getattr(t, n, None) is not None}


def _nbytes(t: torch.Tensor) -> int:
    if _is_quantized(t):
        return sum(_nbytes(x) for x in _inner(t).values())
    return t.numel() * t.element_size()


def model_nbytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, a torchao-quantized weight counted by its inner tensors
    (so diffspeed's own quantized layers, which keep their weights in buffers, count too)."""
    return sum(_nbytes(t) for t in list(model.parameters()) + list(model.buffers()))


def sensitive_reason(fqn: str) -> str | None:
    """The reason ``fqn`` is in the default skip list, or None."""
    for reason, pattern in SENSITIVE_PATTERNS:
        if re.search(pattern, fqn):
            return reason
    return None


def select_layers(model: nn.Module, config: QuantizeConfig,
                  filter_fn: Callable[[nn.Module, str], bool] | None = None) -> tuple[list[str], dict[str, str]]:
    """(fqns to quantize, {skipped fqn: reason}) for the model's ``nn.Linear`` layers."""
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    for fqn, module in model.named_modules():
        if not fqn or not isinstance(module, nn.Linear):
            continue  # anything not an nn.Linear is never quantized
        if any(re.search(p, fqn) for p in config.exclude):
            skipped[fqn] = "excluded by pattern"
            continue
        if not any(re.search(p, fqn) for p in config.include):
            if filter_fn is not None:
                if not filter_fn(module, fqn):
                    skipped[fqn] = "filter_fn returned False"
                    continue
            elif config.skip_sensitive and (reason := sensitive_reason(fqn)):
                skipped[fqn] = f"sensitive: {reason}"
                continue
        if config.backend == "int4_weight_only" and module.in_features % INT4_GROUP_SIZE:
            skipped[fqn] = f"in_features {module.in_features} not divisible by int4 group size {INT4_GROUP_SIZE}"
            continue
        chosen.append(fqn)
    return chosen, skipped


# ---- applying ------------------------------------------------------------------------------------

def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _quantize(model: nn.Module, config: QuantizeConfig, fqns: list[str], skipped: dict[str, str]) -> QuantizeReport:
    already = [f for f, m in model.named_modules() if isinstance(m, nn.Linear) and _is_quantized(m.weight)]
    if already:
        raise AlreadyAppliedError(
            f"quantize_: {len(already)} linear layers are already quantized (e.g. {already[0]!r}); "
            "reload the model to quantize it again"
        )
    reasons = backend_unavailable_reasons(config.backend, _model_device(model))
    if reasons:
        raise DiffspeedError(f"quantize_ backend {config.backend!r} is unavailable: " + "; ".join(reasons))
    from torchao.quantization import quantize_

    modules = dict(model.named_modules())
    report = QuantizeReport(config.backend, skipped=dict(skipped))
    report.weight_bytes_before = model_nbytes(model)
    report.quantized_bytes_before = sum(_nbytes(modules[f].weight) for f in fqns)
    wanted = set(fqns)
    if wanted:
        with _inductor_config_kept():
            quantize_(model, _torchao_config(config.backend), filter_fn=lambda m, fqn: fqn in wanted)
    missed = [f for f in fqns if not _is_quantized(modules[f].weight)]
    if missed and len(missed) == len(fqns):  # never report a silent no-op as quantized
        raise DiffspeedError(
            f"quantize_ backend {config.backend!r}: torchao left all {len(missed)} selected layers unquantized "
            f"(e.g. {missed[0]!r}); this torchao version may not support the backend here"
        )
    for f in missed:  # torchao skips shapes its kernel cannot take (what TorchAoConfig users get): say so
        report.skipped[f] = f"torchao's {config.backend} left it in float (shape {tuple(modules[f].weight.shape)})"
    fqns = [f for f in fqns if f not in report.skipped]
    report.quantized = list(fqns)
    report.weight_bytes_after = model_nbytes(model)
    report.quantized_bytes_after = sum(_nbytes(modules[f].weight) for f in fqns)
    return report


def _finish(model: nn.Module, config: MethodConfig, report: Any) -> MethodHandle:
    """The method handle of a quantized model (shared with ``ptq_``): size stats, ``handle.report``."""
    handle = MethodHandle(model, config)
    handle.stats.update({
        "layers_quantized": len(report.quantized),
        "layers_skipped": len(report.skipped),
        "weight_mb_before": report.weight_bytes_before / 2**20,
        "weight_mb_after": report.weight_bytes_after / 2**20,
    })
    handle.report = report  # type: ignore[attr-defined]
    report.handle = handle
    return handle


def _unapplied(model: nn.Module, config: MethodConfig) -> dict[str, MethodHandle]:
    """The model's applied methods; raises if ``config``'s method is among them (shared with ``ptq_``)."""
    applied = _applied(model)
    if config.method in applied:
        raise AlreadyAppliedError(f"method {config.method!r} is already applied to this model; reload it first")
    return applied


def quantize_model_(model: nn.Module, config: QuantizeConfig | None = None,
                    filter_fn: Callable[[nn.Module, str], bool] | None = None) -> QuantizeReport:
    """Quantize ``model``'s linear layers in place; returns a report (``report.handle`` is the handle).

    ``filter_fn(module, fqn) -> bool`` replaces the sensitive-layer rule; ``config.include`` and
    ``config.exclude`` still apply. Raises :class:`AlreadyAppliedError` on an already quantized model.
    """
    config = config or QuantizeConfig()
    applied = _unapplied(model, config)
    fqns, skipped = select_layers(model, config, filter_fn)
    report = _quantize(model, config, fqns, skipped)
    applied[config.method] = _finish(model, config, report)
    return report


@contextlib.contextmanager
def _inductor_config_kept() -> Iterator[None]:
    """Undo the process-wide Inductor settings torchao's configs switch on when applied
    (``recommended_inductor_config_setter``: coordinate-descent kernel tuning and more). Left on, they
    silently change how every model compiled afterwards in the process is built, and a benchmark's
    later rows (or the float baseline) would be compiled differently from its earlier ones. The same
    tuning is available per compile: ``CompileConfig(tune_kernels=True)``."""
    import torch._inductor.config as inductor_config

    saved = inductor_config.save_config()
    try:
        yield
    finally:
        inductor_config.load_config(saved)


@register_method(QuantizeConfig)
def apply_quantize(model: nn.Module, config: QuantizeConfig, adapter: ModelAdapter) -> MethodHandle:
    fqns, skipped = select_layers(model, config)
    return _finish(model, config, _quantize(model, config, fqns, skipped))


# ---- save / load without pickle --------------------------------------------------------------------

def _tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def _load_into(state: dict[str, torch.Tensor], targets: Iterable[tuple[str, torch.Tensor]], problems: list[str]) -> None:
    """Copy (under no_grad) each saved tensor popped from ``state`` into its target; mismatches go to ``problems``."""
    for key, target in targets:
        value = state.pop(key, None)
        if value is None:
            problems.append(f"missing {key}")
        elif value.shape != target.shape or value.dtype != target.dtype:
            problems.append(f"{key}: saved {value.dtype}{list(value.shape)}, model {target.dtype}{list(target.shape)}")
        else:
            target.copy_(value.to(target.device))


def _raise_problems(src: Path, problems: list[str], state: dict[str, torch.Tensor], tail: str = "") -> None:
    """WeightFileError naming the first mismatches (and the saved tensors the model lacks), if any."""
    problems += [f"unexpected {k}" for k in state]
    if problems:
        raise WeightFileError(f"{src} does not match the model: " + "; ".join(problems[:5])
                              + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "") + tail)


def save_quantized(model: nn.Module, path: str | Path) -> Path:
    """Write a quantized model to directory ``path``: ``quantized.safetensors`` (plain tensors, and each
    quantized weight as its inner tensors ``<name>::<attr>``, e.g. int8 ``qdata`` + ``scale``) and
    ``quantize_config.json`` (backend, quantized fqns, torchao version). No pickle anywhere."""
    from safetensors.torch import save_file

    handle = _applied(model).get(QuantizeConfig.method)
    if handle is None:
        raise DiffspeedError("save_quantized: this model was not quantized with diffspeed's quantize_")
    report: QuantizeReport = handle.report  # type: ignore[attr-defined]
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    subclass: dict[str, str] = {}
    for name, t in _tensors(model):
        if _is_quantized(t):
            subclass[name] = type(t).__name__
            for attr, inner in _inner(t).items():
                tensors[f"{name}::{attr}"] = inner.detach().contiguous().clone().cpu()
        else:
            tensors[name] = t.detach().contiguous().clone().cpu()
    save_file(tensors, str(out / WEIGHTS_FILE))
    meta = {
        "diffspeed_quantized": FORMAT_VERSION,
        "config": handle.config.to_dict(),
        "quantized": report.quantized,
        "subclass_tensors": subclass,
        "torchao_version": _torchao_version(),
        "torch_version": torch.__version__,
        "model_class": type(model).__name__,
    }
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_quantized_(model: nn.Module, path: str | Path) -> QuantizeReport:
    """Quantize an unquantized ``model`` (same architecture as the saved one) the same way, then load the
    saved tensors into it. Outputs are bit-identical to the saved model's."""
    from safetensors.torch import load_file

    from .base import config_from_dict

    src = Path(path)
    if not (src / CONFIG_FILE).exists() or not (src / WEIGHTS_FILE).exists():
        raise WeightFileError(f"{src} is not a quantized checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads((src / CONFIG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise WeightFileError(f"{src / CONFIG_FILE} is not valid JSON: {exc.msg}") from None
    if meta.get("diffspeed_quantized") != FORMAT_VERSION:
        raise WeightFileError(f"{src}: unsupported quantized format {meta.get('diffspeed_quantized')!r}")
    if meta.get("model_class") not in (None, type(model).__name__):
        raise WeightFileError(f"{src} was saved from a {meta['model_class']}, not a {type(model).__name__}")
    config = config_from_dict(meta["config"])
    assert isinstance(config, QuantizeConfig)
    modules = dict(model.named_modules())
    fqns = list(meta["quantized"])
    missing = [f for f in fqns if not isinstance(modules.get(f), nn.Linear)]
    if missing:
        raise WeightFileError(f"{src}: the model has no linear layer {missing[0]!r} (and {len(missing) - 1} more)")
    applied = _applied(model)
    if config.method in applied:
        raise AlreadyAppliedError("load_quantized_ needs an unquantized model; reload it first")
    linear = [f for f, m in model.named_modules() if f and isinstance(m, nn.Linear)]
    skipped = {f: "not quantized in the saved checkpoint" for f in linear if f not in set(fqns)}
    report = _quantize(model, config, fqns, skipped)
    state = load_file(str(src / WEIGHTS_FILE))
    problems: list[str] = []
    with torch.no_grad():
        for name, t in _tensors(model):
            targets = {f"{name}::{a}": x for a, x in _inner(t).items()} if _is_quantized(t) else {name: t}
            _load_into(state, targets.items(), problems)
    _raise_problems(src, problems, state)
    applied[config.method] = _finish(model, config, report)
    return report


__all__ = [
    "BACKENDS",
    "QuantizeConfig",
    "QuantizeReport",
    "SENSITIVE_PATTERNS",
    "backend_unavailable_reasons",
    "load_quantized_",
    "quantize_model_",
    "save_quantized",
    "select_layers",
    "sensitive_reason",
]
