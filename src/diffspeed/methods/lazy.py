"""LazyDiT: learned per-block laziness, with decisions that never sync.

After "LazyDiT: Lazy Learning for the Acceleration of Diffusion Transformers" (Shen et al., AAAI 2025).
The output of a transformer module at step ``t`` is highly similar to its output at step ``t - 1``;
a tiny learned predictor looks at the module's (modulated) input and decides whether the module may
be skipped, its output then being a linear function of the cached one.

What runs here (block granularity: one gate per transformer block):

* **Gate.** ``g_b(x) = sigmoid(w_b . pool(z_b) + c_b)`` with ``z_b`` the block's *modulated* input at
  the current step and ``pool`` the mean over tokens, so a gate is one dot product on a (B, D) tensor:

  - DiT (``BasicTransformerBlock`` with ``ada_norm_zero``): ``z`` = the output of the block's
    ``norm1`` (adaLN-Zero: ``LN(x) * (1 + scale_msa) + shift_msa``, which also carries the timestep
    and class). On a computed block it is captured from the block's own ``norm1`` call (a wrapper on
    ``norm1``: no recomputation); on a skipped block ``norm1`` is run alone (the adaLN embedding
    MLP + one LayerNorm: the predictor's cost, as in the paper);
  - PixArt (``ada_norm_single``): ``mean(LN(x)) * (1 + scale_msa) + shift_msa`` from the block's
    ``scale_shift_table`` and timestep (pooling commutes with the per-sample modulation);
  - every other family (SD3, Flux, Wan, CogVideoX blocks): the pooled layer-normed block input
    ``mean(LN(x))`` (no affine, no modulation: their modulation lives in differently-shaped calls; the
    gate then sees the state of the trajectory but not the timestep directly).

  The gate's value for the batch is the mean of the per-sample gates (one decision per block and
  forward: skipping per sample would need ``torch.where`` on both paths and save nothing).
* **Skip.** A skipped block returns ``x + alpha_b ** k * r_b`` with ``r_b`` its residual (output minus
  input, hidden and encoder states where the block returns both) cached at the last computed step and
  ``k`` the steps since then; ``alpha_b`` is a learned scalar (initialised 1): the paper's "linear
  approximation" ``r_t ~ alpha r_{t-1}``, extrapolated geometrically over ``k`` steps (``k`` is 1
  unless ``max_consecutive`` > 1 lets a block skip again).
* **Decision timing (the lag).** The decision for block ``b`` at step ``t`` uses the gate value computed
  from that block's input at step ``t - 1`` (every block computes its gate at every step but the
  last, skipped or not). The value is copied to pinned host memory asynchronously
  (:class:`~diffspeed.methods.lagged.LaggedScalar`) and read one step later, when the device has long
  produced it: the hot path never waits for the device (deciding on the current step's gate value
  would make the host wait for the device at every block, draining the launch queue). The gates are
  *trained for the lag* (:mod:`diffspeed.train.lazy_gates`: features from step ``t - 1``, target the
  reuse error at step ``t``), so train and inference see the same thing. ``warmup_steps`` first steps always compute;
  a block skips at most ``max_consecutive`` steps in a row.
* **Threshold.** Skip when ``g > threshold``. Gates trained with laziness weight ``lambda`` approximate
  ``g = min(1, lambda / (2 e))`` with ``e`` the relative squared error of the block output under reuse,
  so ``threshold`` sets the error tolerance: skip roughly when ``e < lambda / (2 threshold)``. Higher =
  fewer skips; 1.0 never skips (a sigmoid never exceeds 1): bit-identical to the full model.

Why blocks, not attention and MLP separately (the paper gates each module of a block): the block is
the unit every diffspeed adapter exposes (:class:`~diffspeed.adapters.base.BlockIO`), so one
implementation serves DiT, PixArt, SD3, Flux, Wan and CogVideoX; gating the modules separately needs a
re-implementation of each family's block ``forward`` (diffusers' ``BasicTransformerBlock.forward``
alone has six norm-type branches and changes between releases), and a skipped block saves both
modules at the cost of one host decision instead of two. The cost is coarser granularity: a block
whose attention is stable but whose MLP is not cannot be half-skipped.

Gates: a directory with ``gates.safetensors`` (``w`` (n_blocks, D), ``c``, ``alpha`` (n_blocks,),
float32) and ``lazy.json`` (format ``diffspeed-lazy/1``: model class + config hash, feature kinds,
training steps, lambda, achieved skip ratio on the training data, ...), written by
``diffspeed train-gates lazy`` (:mod:`diffspeed.train.lazy_gates`). ``gates`` is that directory, or a
built-in name (``"reference-image"`` -> ``diffspeed/weights/lazy-reference-image/``). Gates refuse a
model of another class or config. They were trained for one step count and guidance scale (recorded,
not enforced: the gate only sees the block input).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.base import BlockIO, ModelAdapter
from ..context import get_context
from ..errors import DiffspeedError, IncompatibleMethodsError
from ..hooks import wrap_forward
from .base import MethodConfig, MethodHandle, Stage, applied_methods, register_method
from .lagged import LaggedScalar

FORMAT = "diffspeed-lazy/1"
GATES_FILE = "gates.safetensors"
META_FILE = "lazy.json"
BUILTIN_PREFIX = "lazy-"
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
TRAIN_CMD = "diffspeed train-gates lazy"


def _check_int(name: str, value: Any, minimum: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DiffspeedError(f"lazy {name} must be an integer >= {minimum}{hint}, got {value!r}")


@dataclass(frozen=True)
class LazyConfig(MethodConfig):
    """Skip blocks whose learned gate (LazyDiT) says their output barely changes; reuse alpha * cached residual.

    gates: directory written by ``diffspeed train-gates lazy`` for this model, or a built-in name
        (``"reference-image"`` -> the shipped ``weights/lazy-reference-image/``).
    threshold: skip a block when its gate value (previous step, batch mean) is above this, in [0, 1];
        higher = fewer skips, 1.0 never skips.
    warmup_steps: the first steps are always computed.
    max_consecutive: a block skips at most this many steps in a row.
    """

    method: ClassVar[str] = "lazy"
    stage: ClassVar[Stage] = Stage.BLOCK
    incompatible: ClassVar[dict[str, str]] = {
        "step_cache": (
            "a step skipped whole by step_cache never reaches lazy's blocks, so their gates and cached residuals "
            "go stale; use one of them"
        ),
        "block_cache": "both decide per step which blocks reuse a cached residual; use one of them",
        "erta_cache": (
            "a step skipped whole by erta_cache never reaches lazy's blocks, so their gates and cached residuals "
            "go stale; use one of them"
        ),
        "motion_cache": (
            "motion_cache runs the blocks on a changing subset of tokens, so lazy's cached per-block residuals "
            "would belong to other tokens; use one of them"
        ),
    }
    compile_note: ClassVar[str] = (
        "the skip decision and the gate's async host copy are host-side Python (excluded from tracing with "
        "torch.compiler.disable: graph breaks per block); compile the blocks, not the wrappers: each of the two "
        "paths (compute / skip) is traced once"
    )

    gates: str = "reference-image"
    threshold: float = 0.5
    warmup_steps: int = 2
    max_consecutive: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.gates, str) or not self.gates.strip():
            raise DiffspeedError(
                f"lazy needs `gates`: a gates directory or a built-in name (e.g. 'reference-image'); "
                f"train gates with `{TRAIN_CMD} --model <model> --out <dir>`"
            )
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise DiffspeedError(f"lazy threshold must be in [0, 1] (0.5 = the training threshold), got {t!r}")
        _check_int("warmup_steps", self.warmup_steps, 1, " (the first step has nothing to reuse)")
        _check_int("max_consecutive", self.max_consecutive, 1)


# ---- block features (the gate's input) -------------------------------------------------------------
def _arg(args: tuple, kwargs: dict, name: str, pos: int) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[pos] if len(args) > pos else None


# positions in BasicTransformerBlock.forward(hidden_states, attention_mask, encoder_hidden_states,
# encoder_attention_mask, timestep, cross_attention_kwargs, class_labels, ...)
_TIMESTEP_POS, _CLASS_POS = 4, 6


def _pool(x: torch.Tensor) -> torch.Tensor:
    """(B, ..., D) -> (B, D) float32 mean over tokens (accumulated in float32, no full-size copy)."""
    if x.dim() > 3:
        x = x.flatten(1, -2)
    return torch.mean(x, dim=1, dtype=torch.float32)


class BlockFeature:
    """Reads one block's pooled modulated input, the gate's input (see the module doc for the kinds)."""

    def __init__(self, block: nn.Module) -> None:
        norm_type = getattr(block, "norm_type", None)
        norm1 = getattr(block, "norm1", None)
        if norm_type == "ada_norm_zero" and isinstance(norm1, nn.Module):
            self.kind = "ada_norm_zero"
        elif norm_type == "ada_norm_single" and isinstance(norm1, nn.Module) and hasattr(block, "scale_shift_table"):
            self.kind = "ada_norm_single"
        else:
            self.kind = "layer_norm"
        self.block = block
        # the module whose output is captured on computed blocks (None: compute the feature explicitly)
        self.capture_module: nn.Module | None = norm1 if self.kind != "layer_norm" else None

    def _modulate(self, pooled: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        if self.kind != "ada_norm_single":
            return pooled
        timestep = _arg(args, kwargs, "timestep", _TIMESTEP_POS)
        table = self.block.scale_shift_table
        mod = (table[None] + timestep.reshape(pooled.shape[0], 6, -1)).float()
        shift, scale = mod[:, 0], mod[:, 1]
        return pooled * (1 + scale) + shift

    def from_captured(self, captured: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        """The feature from ``capture_module``'s output during the block's own call."""
        out = captured[0] if isinstance(captured, tuple) else captured
        return self._modulate(_pool(out), args, kwargs)

    def compute(self, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """The feature computed on its own (skipped blocks, training data collection)."""
        if self.kind == "ada_norm_zero":
            timestep = _arg(args, kwargs, "timestep", _TIMESTEP_POS)
            labels = _arg(args, kwargs, "class_labels", _CLASS_POS)
            out = self.block.norm1(hidden, timestep, labels, hidden_dtype=hidden.dtype)
            return self.from_captured(out, args, kwargs)
        if self.kind == "ada_norm_single":
            return self._modulate(_pool(self.block.norm1(hidden)), args, kwargs)
        return _pool(F.layer_norm(hidden, (hidden.shape[-1],)))


def block_features(adapter: ModelAdapter, model: nn.Module) -> list[BlockFeature]:
    return [BlockFeature(block) for _, block, _ in adapter.blocks(model)]


def split_residual(io: BlockIO, hidden: torch.Tensor, encoder: torch.Tensor | None, out: Any):
    """(output hidden, output encoder, hidden residual, encoder residual or None) of one block call."""
    h_out, e_out = io.split_output(out)
    res_e = e_out - encoder if (e_out is not None and encoder is not None and e_out.shape == encoder.shape) else None
    return h_out, e_out, h_out - hidden, res_e


# ---- gate files -------------------------------------------------------------------------------------
@dataclass
class LazyGates:
    w: torch.Tensor  # (n_blocks, D) float32
    c: torch.Tensor  # (n_blocks,)
    alpha: torch.Tensor  # (n_blocks,)
    meta: dict[str, Any]
    source: str = "<in memory>"

    @property
    def num_blocks(self) -> int:
        return int(self.w.shape[0])


def builtin_gate_names() -> list[str]:
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name[len(BUILTIN_PREFIX):] for p in WEIGHTS_DIR.iterdir()
                  if p.is_dir() and p.name.startswith(BUILTIN_PREFIX) and (p / META_FILE).is_file())


def resolve_gates_dir(gates: str | os.PathLike) -> Path:
    """A gates directory, or the shipped ``weights/lazy-<name>/`` for a built-in name."""
    name = os.fspath(gates)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise DiffspeedError(f"lazy gates {name!r} is a file; give the directory holding {META_FILE} and {GATES_FILE}")
    builtin = WEIGHTS_DIR / (name if name.startswith(BUILTIN_PREFIX) else BUILTIN_PREFIX + name)
    if "/" not in name and os.sep not in name and builtin.is_dir():
        return builtin
    known = ", ".join(builtin_gate_names()) or "(none shipped yet)"
    model = name[len(BUILTIN_PREFIX):] if name.startswith(BUILTIN_PREFIX) else name
    hint = model if "/" not in name and os.sep not in name else "<model>"
    raise DiffspeedError(
        f"lazy gates {name!r} not found: no such directory, and no built-in gates at {builtin}; built-in names: "
        f"{known}. Train gates with `{TRAIN_CMD} --model {hint} --out <dir>` and pass that directory as `gates`"
    )


def _bad(source: str, problem: str) -> DiffspeedError:
    return DiffspeedError(
        f"lazy gates {source} are invalid ({problem}); retrain them with `{TRAIN_CMD} --model <model> --out {source}`"
    )


def load_lazy_gates(gates: str | os.PathLike) -> LazyGates:
    """Read and check a gates directory (or built-in name); problems raise :class:`DiffspeedError` naming the fix."""
    folder = resolve_gates_dir(gates)
    source = str(folder)
    meta_path, tensor_path = folder / META_FILE, folder / GATES_FILE
    for p in (meta_path, tensor_path):
        if not p.is_file():
            raise DiffspeedError(
                f"lazy gates directory {source} has no {p.name}; train gates with "
                f"`{TRAIN_CMD} --model <model> --out {source}`"
            )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(source, f"cannot read {META_FILE}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise _bad(source, f"{META_FILE} has format {fmt!r}, this diffspeed reads {FORMAT!r}")
    model = meta.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("class"), str) or not isinstance(model.get("config_hash"), str):
        raise _bad(source, "'model' must hold 'class' and 'config_hash' strings")
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(tensor_path))
    except Exception as exc:  # noqa: BLE001 - any read problem: a corrupted file
        raise _bad(source, f"cannot read {GATES_FILE}: {type(exc).__name__}: {exc}") from None
    missing = [k for k in ("w", "c", "alpha") if k not in tensors]
    if missing:
        raise _bad(source, f"{GATES_FILE} lacks {', '.join(missing)}")
    w, c, alpha = (tensors[k].float() for k in ("w", "c", "alpha"))
    n = w.shape[0] if w.dim() == 2 else -1
    if w.dim() != 2 or c.shape != (n,) or alpha.shape != (n,):
        raise _bad(source, f"shapes w {tuple(w.shape)}, c {tuple(c.shape)}, alpha {tuple(alpha.shape)} do not match")
    if not all(torch.isfinite(t).all() for t in (w, c, alpha)):
        raise _bad(source, "non-finite values")
    if meta.get("num_blocks") != n:
        raise _bad(source, f"{META_FILE} says {meta.get('num_blocks')} blocks, {GATES_FILE} holds {n}")
    return LazyGates(w, c, alpha, meta, source)


def save_lazy_gates(folder: str | os.PathLike, w: torch.Tensor, c: torch.Tensor, alpha: torch.Tensor,
                    meta: dict[str, Any]) -> Path:
    """Write ``gates.safetensors`` + ``lazy.json`` into ``folder`` (each written to a temp file, then renamed)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiffspeedError(f"cannot create gates directory {folder}: {exc}") from None
    meta = dict(meta, format=FORMAT, num_blocks=int(w.shape[0]), feature_dim=int(w.shape[1]))
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in (("w", w), ("c", c), ("alpha", alpha))}
    for name, write in ((GATES_FILE, lambda p: save_file(tensors, p)),
                        (META_FILE, lambda p: Path(p).write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n"))):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, folder / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return folder


def check_gates_model(gates: LazyGates, model: nn.Module, features: list[BlockFeature]) -> None:
    """Refuse gates trained for another model class / config (or whose block layout does not match)."""
    from ..calibrate import model_identity

    want, have = gates.meta["model"], model_identity(model)
    fix = (f"train gates for this model with `{TRAIN_CMD} --model <this model's name or path> --out <dir>` "
           "and pass that directory as `gates`")
    if want.get("class") != have["class"] or want.get("config_hash") != have["config_hash"]:
        made = f"{want.get('class')}/{want.get('config_hash')}"
        if want.get("name"):
            made += f" ({want['name']})"
        raise DiffspeedError(
            f"lazy gates {gates.source} were trained for {made}, this model is {have['class']}/{have['config_hash']}; {fix}"
        )
    kinds = [f.kind for f in features]
    if gates.num_blocks != len(features) or gates.meta.get("feature_kinds", kinds) != kinds:
        raise DiffspeedError(
            f"lazy gates {gates.source} expect {gates.num_blocks} blocks with features "
            f"{gates.meta.get('feature_kinds')}, this model gives {len(features)} with {kinds} "
            f"(another diffusers version?); {fix}"
        )


# ---- the method -------------------------------------------------------------------------------------
@register_method(LazyConfig)
def apply_lazy(model: nn.Module, config: LazyConfig, adapter: ModelAdapter) -> MethodHandle:
    applied = applied_methods(model)
    for other, h in applied.items():
        reason = config.incompatible.get(other) or h.config.incompatible.get(config.method)
        if reason:
            raise IncompatibleMethodsError(f"'lazy' cannot be combined with {other!r}: {reason}")
    gates = load_lazy_gates(config.gates)
    features = block_features(adapter, model)
    check_gates_model(gates, model, features)
    return apply_with_gates(model, config, adapter, gates, features)


def apply_with_gates(model: nn.Module, config: LazyConfig, adapter: ModelAdapter, gates: LazyGates,
                     features: list[BlockFeature] | None = None) -> MethodHandle:
    """Apply with already loaded and checked gates (tests and training evaluation use this)."""
    blocks = adapter.blocks(model)
    features = features if features is not None else block_features(adapter, model)
    handle = MethodHandle(model, config)
    ctx = get_context(model)
    key = f"lazy@{id(handle)}"
    handle.state_key = key  # type: ignore[attr-defined]  (tests read per-branch state through it)
    device = next(model.parameters()).device
    w = gates.w.to(device)
    c = gates.c.to(device)
    alpha = [float(a) for a in gates.alpha]  # host floats: scaling by them needs no device value
    threshold = float(config.threshold)
    stats = handle.stats
    stats.update({"computed_blocks": 0, "skipped_blocks": 0, "skipped_fraction": 0.0})
    captured: dict[int, Any] = {}  # block index -> capture_module output during that block's own call
    capturing: set[int] = set()

    @torch.compiler.disable  # host-side: an async device-to-host copy + event, kept out of traced graphs
    def push_gate(bs: dict, i: int, feat: torch.Tensor, step: int) -> None:
        # mean over the batch of sigmoid(w . pool(z) + c): one decision per block and forward, read next step
        bs["gate"] = (LaggedScalar(torch.sigmoid(feat @ w[i] + c[i]).mean()), step)

    @torch.compiler.disable  # host-side bookkeeping: a graph break here, no guards on the cache state
    def decide(i: int, hidden: torch.Tensor) -> tuple[dict, bool, bool]:
        """(block state, skip this call?, is the gate of this step needed?)"""
        st = ctx.state(key)
        bs = st.get(i)
        if bs is None:
            bs = st[i] = {"consecutive": 0}
        step, total = ctx.step_index, ctx.num_steps
        prev = bs.pop("gate", None)  # (LaggedScalar of step t-1's gate, t-1)
        cache = bs.get("cache")  # (hidden residual, encoder residual, step it was computed at)
        skip = (
            prev is not None
            and cache is not None
            and step >= config.warmup_steps
            and prev[1] == step - 1
            and bs["consecutive"] < config.max_consecutive
            and cache[0].shape == hidden.shape
            and prev[0].read(stats) > threshold  # lagged: produced a whole step ago, no wait
        )
        bs["consecutive"] = bs["consecutive"] + 1 if skip else 0
        stats["skipped_blocks" if skip else "computed_blocks"] += 1
        stats["skipped_fraction"] = stats["skipped_blocks"] / (stats["skipped_blocks"] + stats["computed_blocks"])
        # the gate of this step decides the next one: only needed if a next step may skip
        need_next = (total is None or step + 1 < total) and step + 1 >= config.warmup_steps
        return bs, skip, need_next

    def wrapper(i: int, io: BlockIO, inner: Any, *args: Any, **kwargs: Any) -> Any:
        hidden, encoder = io.get_states(args, kwargs)
        feature = features[i]
        bs, skip, need_next = decide(i, hidden)
        step = ctx.step_index
        if skip:
            res_h, res_e, computed_at = bs["cache"]
            scale = alpha[i] ** (step - computed_at)
            new_h = torch.add(hidden, res_h, alpha=scale)
            new_e = encoder
            if encoder is not None and res_e is not None and res_e.shape == encoder.shape:
                new_e = torch.add(encoder, res_e, alpha=scale)
            if need_next:
                push_gate(bs, i, feature.compute(hidden, args, kwargs), step)
            return io.make_output(new_h, new_e)
        if not need_next:
            bs.pop("cache", None)  # nothing will reuse it
            return inner(*args, **kwargs)
        if feature.capture_module is not None:
            capturing.add(i)
            try:
                out = inner(*args, **kwargs)
            finally:
                capturing.discard(i)
            got = captured.pop(i, None)
            feat = feature.from_captured(got, args, kwargs) if got is not None else feature.compute(hidden, args, kwargs)
        else:
            feat = feature.compute(hidden, args, kwargs)
            out = inner(*args, **kwargs)
        _, _, res_h, res_e = split_residual(io, hidden, encoder, out)
        bs["cache"] = (res_h, res_e, step)
        push_gate(bs, i, feat, step)
        return out

    def capture(i: int, inner: Any, *args: Any, **kwargs: Any) -> Any:
        out = inner(*args, **kwargs)
        if i in capturing:
            capturing.discard(i)  # the first call of the block's own forward only
            captured[i] = out
        return out

    for i, ((_, block, io), feature) in enumerate(zip(blocks, features)):
        if feature.capture_module is not None:
            fn_cap = lambda inner, *a, _i=i, **k: capture(_i, inner, *a, **k)  # noqa: E731
            handle.on_remove(wrap_forward(feature.capture_module, fn_cap).remove)
        fn = lambda inner, *a, _i=i, _io=io, **k: wrapper(_i, _io, inner, *a, **k)  # noqa: E731
        handle.on_remove(wrap_forward(block, fn).remove)
    handle.on_remove(captured.clear)
    return handle
