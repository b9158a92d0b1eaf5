"""ERTACache: step-level reuse on a static, calibrated schedule, with error rectification and timestep adjustment.

After "ERTACache: Error Rectification and Timesteps Adjustment for Efficient Diffusion" (Peng et al.,
2025). The paper splits the error of a step cache into a *feature shift* error (the reused features
are not the ones the step would have computed) and a *step amplification* error (a wrong velocity
integrated over the fixed interval of the schedule), and fixes each with something fitted offline:

1. **Offline residual profiling -> static schedule.** :func:`diffspeed.calibrate.calibrate_erta` runs
   the full model on a few calibration samples and records, per step, the relative L1 change of the
   transformer residual (last block's output minus first block's input), averaged over samples and
   CFG branches. A TeaCache-style rule on those *measured* changes (accumulate while below
   ``threshold``; cap on consecutive reuses; warm-up and final steps always computed) gives one fixed
   boolean per step. At generation time nothing is measured: the decisions are a list lookup, so
   the hot path has no device-to-host sync at all, and the schedule is reproducible on every device.
2. **Residual linearization (error rectification).** On a reused step ``k`` the residual is
   predicted as ``r_k ~= a_k r_m + b_k (r_m - r_m')`` with ``m`` the last computed step and ``m'``
   the computed step before it; ``(a_k, b_k)`` are closed-form least-squares coefficients (2x2
   normal equations, a small ridge toward plain reuse ``(1, 0)``) fitted on calibration data.
   Calibrations made with ``correction="channel"`` (the default) hold one ``(a, b)`` per hidden
   channel instead (``channel_coeffs``; optionally a third weight on the curvature
   ``r_m - 2 r_m' + r_m''``): hidden channels drift at different rates, and one pair per step fits
   the average channel. Rewritten once at apply time as weights on ``r_m, r_m', r_m''`` themselves,
   a reused step costs one ``mul`` plus one ``addcmul`` per older residual, on the device.
3. **Trajectory-aware timestep adjustment.** The sampler owns the Euler update
   ``x += dt * v``; integrating the reused velocity over a corrected interval ``dt_scale[k] * dt``
   is the same as ``x += dt * (dt_scale[k] * v)``, so a reused step scales the model *output* by
   ``dt_scale[k]`` (a wrapper on the transformer's top-level forward; diffusers output objects,
   tuples and bare tensors are handled; for learned-sigma models only the first ``in_channels``
   output channels, the prediction, are scaled). Both CFG branches are scaled, so the guided
   velocity is scaled too (CFG is linear).

4. **Guidance reuse** (ours, opt-in at calibration: ``--guidance-threshold``). On the calibration's
   ``guidance_reuse`` steps, which are *computed* steps, a batched-CFG call runs only its second
   (cond) half through the model, and the first (uncond) half of the output and of the block-stack
   residual is rebuilt as ``cond - d`` from the branch difference ``d`` of the last step that
   computed both halves (``guidance_order`` 1: extrapolated from the last two). Half the block work
   of those steps; the guided velocity keeps a slightly stale guidance direction. Separate cond /
   uncond calls have nothing to halve: they compute in full (``guidance_reuse_unavailable``).

Apply loads the calibration JSON and refuses (naming the fix) when the file is missing, corrupt or
of another format version, when it was made for another model class / config, and, at the first
forward of a generation, when the generation's step count differs from the calibrated one. A
reused step skips every block (block 0 adds the corrected residual, the others pass through), like
``step_cache``. The schedule is the same for cond and uncond; residual state is per CFG branch
(:meth:`~diffspeed.context.StepContext.state`). ``handle.stats``: ``computed_steps``,
``skipped_steps``, ``skipped_blocks`` (per forward call, so separate-CFG runs count each branch),
plus ``corrected_steps``, ``dt_adjusted_steps``, ``guidance_reused_steps`` and ``guidance_reuse_unavailable``.

Differences from the paper (see also :mod:`diffspeed.calibrate`): the schedule is built from the
step-to-step residual change of the full trajectory (the paper profiles the reuse error of
candidate policies); the linearization is two scalars, or two weights per channel, per reused
step (shared by all tokens and CFG branches) rather than the paper's per-step error model; ``m'`` is the previous
*computed* step (``r_{m-1}`` does not exist when step ``m-1`` was itself reused); encoder-state
residuals (models whose blocks return them) are reused plainly; ``dt_scale`` is fitted
sequentially on the cached trajectory toward the full trajectory's next state, clamped, and
calibration keeps a correction only if it lowers the final error on the calibration samples.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from ..adapters.base import BlockIO, ModelAdapter
from ..context import get_context
from ..errors import DiffspeedError, IncompatibleMethodsError
from ..hooks import output_tensor, wrap_forward
from .base import MethodConfig, MethodHandle, Stage, applied_methods, register_method


@dataclass(frozen=True)
class ErtaCacheConfig(MethodConfig):
    """Reuse the whole block stack on the calibrated steps, with rectified residuals and adjusted timesteps.

    calibration: path of the JSON written by ``diffspeed calibrate erta`` (or
        :func:`diffspeed.calibrate.calibrate_erta` + ``save_calibration``) for this model and step count.
    use_timestep_adjust: scale the output of reused steps by the calibrated ``dt_scale`` (False = fixed intervals).
    use_residual_correction: use the calibrated linearization ``a r_m + b (r_m - r_m')`` (False = plain reuse of ``r_m``).
    use_guidance_reuse: on the calibration's ``guidance_reuse`` steps, compute only the second half of a
        batched-CFG call and rebuild the first half from the last fully computed step's branch
        difference (False = compute both halves; calibrations without such steps are unaffected).
    """

    method: ClassVar[str] = "erta_cache"
    stage: ClassVar[Stage] = Stage.STEP
    incompatible: ClassVar[dict[str, str]] = {
        "step_cache": "both decide which steps skip the whole block stack; use one of them",
        "block_cache": (
            "a step skipped whole by erta_cache never reaches block_cache's front blocks, so its schedule and "
            "cached residuals go stale; use one of them"
        ),
    }
    compile_note: ClassVar[str] = (
        "the reuse decision is a host-side lookup in a static schedule (no device values): compile the blocks, "
        "not the wrappers; each of the two paths (compute / reuse) is traced once"
    )

    calibration: str = ""
    use_timestep_adjust: bool = True
    use_residual_correction: bool = True
    use_guidance_reuse: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.calibration, str) or not self.calibration.strip():
            raise DiffspeedError(
                "erta_cache needs `calibration`: the path of a calibration JSON; create one with "
                "`diffspeed calibrate erta --model <model> --steps <N> --out erta.json`"
            )
        for name in ("use_timestep_adjust", "use_residual_correction", "use_guidance_reuse"):
            if not isinstance(getattr(self, name), bool):
                raise DiffspeedError(f"erta_cache {name} must be true or false, got {getattr(self, name)!r}")


# ---- helpers shared with diffspeed.calibrate ------------------------------------------------------
def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def scale_prediction(sample: torch.Tensor, scale: float, model: nn.Module) -> torch.Tensor:
    """``sample * scale``; for learned-sigma models (out = 2 x in channels) only the prediction channels."""
    config = getattr(_base(model), "config", None)
    c_in = getattr(config, "in_channels", None) if config is not None else None
    c_out = getattr(config, "out_channels", None) if config is not None else None
    if (
        isinstance(c_in, int) and isinstance(c_out, int) and c_out == 2 * c_in
        and sample.dim() >= 2 and sample.shape[1] == c_out
    ):
        return torch.cat([sample[:, :c_in] * scale, sample[:, c_in:]], dim=1)
    return sample * scale


def with_sample(out: Any, sample: torch.Tensor) -> Any:
    """``out`` with its prediction tensor replaced by ``sample`` (same container type)."""
    if isinstance(out, torch.Tensor):
        return sample
    if isinstance(out, (tuple, list)):
        return type(out)([sample, *out[1:]])
    out.sample = sample
    return out


def scale_model_output(out: Any, scale: float, model: nn.Module) -> Any:
    """Scale the ``sample`` of a transformer's return value: tensor, tuple/list (first item) or diffusers output."""
    sample = output_tensor(out)
    if sample is None:
        raise DiffspeedError(
            f"erta_cache cannot find the prediction in the transformer output of type {type(out).__name__}; "
            "expected a tensor, a tuple whose first item is the prediction, or an object with `.sample`"
        )
    return with_sample(out, scale_prediction(sample, scale, model))  # diffusers BaseOutput keeps its dict in sync


def corrected_residual(r_m: torch.Tensor, r_prev: torch.Tensor | None, a: float, b: float) -> torch.Tensor:
    """``a r_m + b (r_m - r_prev)``; exactly ``r_m`` for ``(1, 0)`` (plain reuse, bit-identical)."""
    if b != 0.0 and r_prev is not None and r_prev.shape == r_m.shape:
        out = torch.add(r_m * (a + b), r_prev, alpha=-b)
        return out
    return r_m if a == 1.0 else r_m * a


def residual_history(r_m: torch.Tensor, r_prev: torch.Tensor | None, r_prev2: torch.Tensor | None,
                     count: int) -> list[torch.Tensor] | None:
    """The last ``count`` computed residuals, newest first (``r_m, r_m', r_m''``); None when fewer exist or
    their shapes differ."""
    history = [r_m, r_prev, r_prev2][:count]
    if any(h is None or h.shape != r_m.shape for h in history):
        return None
    return history  # type: ignore[return-value]


def residual_features(r_m: torch.Tensor, r_prev: torch.Tensor | None, r_prev2: torch.Tensor | None,
                      count: int) -> list[torch.Tensor] | None:
    """What the calibration regresses on: ``r_m``, ``r_m - r_m'``, ``r_m - 2 r_m' + r_m''`` (value, slope,
    curvature; the first ``count``). A ridge toward plain reuse ``(1, 0, 0)`` is natural in this basis."""
    history = residual_history(r_m, r_prev, r_prev2, count)
    if history is None:
        return None
    feats = [r_m]
    if count >= 2:
        feats.append(r_m - history[1])
    if count >= 3:
        feats.append(feats[1] - (history[1] - history[2]))
    return feats


def history_weights(weights: torch.Tensor) -> torch.Tensor:
    """Per-channel feature weights ``[K, C]`` rewritten as weights on the residuals themselves:
    ``w0 r + w1 (r - r') + w2 (r - 2 r' + r'') = (w0 + w1 + w2) r - (w1 + 2 w2) r' + w2 r''``. A reused
    step then forms no differences, only one multiply and ``K - 1`` fused multiply-adds."""
    w = weights.double()
    out = w.clone()
    out[0] = w.sum(dim=0)
    if w.shape[0] >= 2:
        out[1] = -(w[1] + 2.0 * w[2]) if w.shape[0] >= 3 else -w[1]
    return out.float()


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision residuals (weights near 1 would lose ~0.4% in bf16), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def channel_residual(history: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i * r_i`` over the computed residuals (newest first) with one weight per channel (last
    dim); ``weights`` is :func:`history_weights`' ``[len(history), C]``. Accumulated in
    :func:`accumulation_dtype`, returned in the residuals' dtype (also what calibration simulates)."""
    dtype = history[0].dtype
    wide = accumulation_dtype(dtype)
    w = weights.to(history[0].device, wide)  # a no-op for the method's device-resident copy
    out = history[0].to(wide) * w[0]
    for h, w_i in zip(history[1:], w[1:]):
        out = torch.addcmul(out, h.to(wide), w_i)
    return out.to(dtype)


def second_half(value: Any, rows: int) -> Any:
    """Rows ``rows//2:`` of every tensor (also inside dicts/lists/tuples) whose first dim is ``rows``."""
    if isinstance(value, torch.Tensor):
        return value[rows // 2:] if value.dim() > 0 and value.shape[0] == rows else value
    if isinstance(value, dict):
        return {k: second_half(v, rows) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(second_half(v, rows) for v in value)
    return value


def rebuild_first_half(second: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``[second - delta, second]``: the branch difference ``delta = second - first`` of a fully computed step, reused."""
    return torch.cat([second - delta, second], dim=0)


def remember(history: list[tuple[int, Any]], step: int, value: Any) -> None:
    """Keep the branch differences of the last two fully computed steps (for :func:`stale_difference`)."""
    history.append((step, value))
    del history[:-2]


def stale_difference(history: list[tuple[int, Any]], step: int, order: int) -> Any:
    """The branch difference to use at ``step``: the last stored one (``order`` 0) or, with two stored,
    its linear extrapolation ``d_m + (step - m) / (m - m') (d_m - d_m')`` (``order`` 1).

    Values are tensors or tuples of tensors / ``None`` (hidden and encoder residual differences).
    """
    m, d_m = history[-1]
    if order == 0 or len(history) < 2:
        return d_m
    m_prev, d_prev = history[-2]
    w = (step - m) / (m - m_prev)

    def ext(a: Any, b: Any) -> Any:
        return None if a is None or b is None else a + w * (a - b)

    return tuple(ext(a, b) for a, b in zip(d_m, d_prev)) if isinstance(d_m, tuple) else ext(d_m, d_prev)


def difference_sources(schedule: list[bool], guidance: list[bool], order: int) -> set[int]:
    """The fully computed steps whose branch difference a later guidance step reads: the last one
    before it (``order`` 0) or the last two (``order`` 1). Only these store a difference at run time."""
    full: list[int] = []
    sources: set[int] = set()
    for k, (reused, half) in enumerate(zip(schedule, guidance)):
        if half and not reused:
            sources.update(full[-(order + 1):])
        elif not reused:
            full.append(k)
    return sources


def half_difference(full: torch.Tensor) -> torch.Tensor:
    """``second half - first half`` of a batched-CFG tensor (the branch difference to reuse)."""
    first, second = full.chunk(2)
    return second - first


@contextlib.contextmanager
def injected_residual(
    model: nn.Module, adapter: ModelAdapter, res_h: torch.Tensor, res_e: torch.Tensor | None = None
) -> Iterator[None]:
    """While active, the block stack is skipped: block 0 returns its input plus ``res_h`` (and ``res_e``),
    the other blocks pass through. Used by calibration to evaluate a reused step exactly as the method does."""
    blocks = adapter.blocks(model)
    handles = []

    def wrapper(io: BlockIO, first: bool, inner: Any, *args: Any, **kwargs: Any) -> Any:
        hidden, encoder = io.get_states(args, kwargs)
        if first:
            hidden = hidden + res_h
            if encoder is not None and res_e is not None and res_e.shape == encoder.shape:
                encoder = encoder + res_e
        return io.make_output(hidden, encoder)

    try:
        for i, (_, block, io) in enumerate(blocks):
            fn = lambda inner, *a, _io=io, _first=(i == 0), **k: wrapper(_io, _first, inner, *a, **k)  # noqa: E731
            handles.append(wrap_forward(block, fn))
        yield
    finally:
        for h in reversed(handles):
            h.remove()


def _batch_rows(args: tuple, kwargs: dict) -> int | None:
    """Rows of the hidden-states input (first positional tensor, else ``hidden_states``/``x``/``sample``)."""
    for value in (*args[:1], kwargs.get("hidden_states"), kwargs.get("x"), kwargs.get("sample")):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


# ---- the method -----------------------------------------------------------------------------------
@register_method(ErtaCacheConfig)
def apply_erta_cache(model: nn.Module, config: ErtaCacheConfig, adapter: ModelAdapter) -> MethodHandle:
    from ..calibrate import check_model_identity, load_calibration  # calibrate imports this module

    data = load_calibration(config.calibration)
    check_model_identity(data, model, config.calibration)
    return apply_with_data(model, config, adapter, data)


def apply_with_data(model: nn.Module, config: ErtaCacheConfig, adapter: ModelAdapter, data: dict) -> MethodHandle:
    """Apply with an already loaded and validated calibration dict (calibration uses this to validate its fit)."""
    for other, reason in config.incompatible.items():
        if other in applied_methods(model):
            raise IncompatibleMethodsError(f"'erta_cache' cannot be combined with {other!r}: {reason}")

    handle = MethodHandle(model, config)
    blocks = adapter.blocks(model)
    n_blocks = len(blocks)
    ctx = get_context(model)
    key = f"erta_cache@{id(handle)}"
    handle.state_key = key  # type: ignore[attr-defined]  (tests read per-branch state through it)
    source = config.calibration
    n_cal = int(data["num_steps"])
    schedule: list[bool] = [bool(s) for s in data["schedule"]]
    ones = [1.0] * n_cal
    guidance: list[bool] = [bool(g) for g in (data.get("guidance_reuse") or [False] * n_cal)]
    if not config.use_guidance_reuse:
        guidance = [False] * n_cal
    order = int(data.get("guidance_order", 0))
    sources = difference_sources(schedule, guidance, order)  # steps that store their branch difference
    dt_scale: list[float] = [float(s) for s in data["dt_scale"]] if config.use_timestep_adjust else ones
    coeffs: list[tuple[float, float]] = [
        (float(c[0]), float(c[1])) if (c is not None and config.use_residual_correction) else (1.0, 0.0)
        for c in data["residual_coeffs"]
    ]
    raw_channel = data.get("channel_coeffs") if config.use_residual_correction else None
    channel: list[torch.Tensor | None] = [  # in the residual basis: no differences formed per reused step
        history_weights(torch.tensor(c, dtype=torch.float64)) if c is not None else None
        for c in (raw_channel or [None] * n_cal)
    ]
    keep_prev2 = any(c is not None and c.shape[0] >= 3 for c in channel)
    channel_on_device: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    def channel_weights(step: int, like: torch.Tensor) -> torch.Tensor | None:
        w = channel[step]
        if w is None:
            return None
        if w.shape[1] != like.shape[-1]:
            raise DiffspeedError(
                f"calibration file {source} has {w.shape[1]} per-channel coefficients at step {step}, but the "
                f"cached residual has {like.shape[-1]} channels (shape {tuple(like.shape)}); recalibrate for this model"
            )
        wide = accumulation_dtype(like.dtype)
        key_w = (step, like.device, wide)
        if key_w not in channel_on_device:  # copied to the device once, not per call
            channel_on_device[key_w] = w.to(like.device, wide)
        return channel_on_device[key_w]
    model_name = data.get("model", {}).get("name") or "<model>"
    stats = handle.stats
    stats.update({"computed_steps": 0, "skipped_steps": 0, "skipped_blocks": 0,
                  "corrected_steps": 0, "dt_adjusted_steps": 0, "guidance_reused_steps": 0,
                  "guidance_reuse_unavailable": 0})

    def check_steps() -> None:
        total = ctx.num_steps
        if total is None:
            raise DiffspeedError(
                f"erta_cache needs the generation's step count (calibration {source} is for {n_cal} steps) but "
                "it is unknown; use diffspeed's sampler, or wrap the pipeline call in "
                f"`with diffspeed.generation(transformer, num_steps={n_cal}):`"
            )
        if total != n_cal:
            raise DiffspeedError(
                f"calibration file {source} was made for {n_cal} steps, but this generation has {total} steps; "
                f"generate with {n_cal} steps or recalibrate: `diffspeed calibrate erta --model {model_name} "
                f"--steps {total} --out <new.json>`"
            )

    def outer(inner: Any, *args: Any, **kwargs: Any) -> Any:
        st = ctx.state(key)
        if not st.get("checked"):  # first forward of this branch in this generation
            check_steps()
            st["checked"] = True
            st["computed"], st["skipped"] = 0, 0
        step = ctx.step_index
        st["want_reuse"] = 0 <= step < n_cal and schedule[step]
        st["reused"] = False
        st["half"] = False
        if not st["want_reuse"] and 0 <= step < n_cal and guidance[step]:
            rows = _batch_rows(args, kwargs)
            if ctx.cfg_batched and rows and rows % 2 == 0 and st.get("d_out") and st.get("d_res"):
                # guidance reuse: the blocks see only the second half of the CFG batch
                st["half"] = True
                stats["guidance_reused_steps"] += 1
                out = inner(*second_half(args, rows), **second_half(kwargs, rows))
                sample = output_tensor(out)
                if sample is None:
                    raise DiffspeedError(f"erta_cache guidance reuse cannot find the prediction in {type(out).__name__}")
                return with_sample(out, rebuild_first_half(sample, stale_difference(st["d_out"], step, order)))
            stats["guidance_reuse_unavailable"] += 1  # not a batched-CFG call (or nothing stored yet): compute all
        out = inner(*args, **kwargs)
        if st["reused"]:
            scale = dt_scale[step]
            if scale != 1.0:
                stats["dt_adjusted_steps"] += 1
                out = scale_model_output(out, scale, model)
        elif step in sources and ctx.cfg_batched:
            sample = output_tensor(out)
            if sample is not None and sample.shape[0] % 2 == 0:
                remember(st.setdefault("d_out", []), step, half_difference(sample))
        return out

    def store_residual(io: BlockIO, st: dict, out: Any) -> None:
        h_out, e_out = io.split_output(out)
        h_in, e_in = st.pop("inputs")
        res_e = e_out - e_in if (e_out is not None and e_in is not None and e_out.shape == e_in.shape) else None
        res_h = h_out - h_in
        if st.get("half"):  # rebuild the first half from the stored branch difference of the residual
            d_h, d_e = stale_difference(st["d_res"], ctx.step_index, order)
            res_h = rebuild_first_half(res_h, d_h)
            res_e = rebuild_first_half(res_e, d_e) if (res_e is not None and d_e is not None) else None
        elif ctx.step_index in sources and ctx.cfg_batched and res_h.shape[0] % 2 == 0:
            remember(st.setdefault("d_res", []), ctx.step_index,
                     (half_difference(res_h),
                      half_difference(res_e) if (res_e is not None and res_e.shape[0] % 2 == 0) else None))
        if keep_prev2:
            st["r_prev2"] = st.get("r_prev")
        st["r_prev"] = st.get("r_m")
        st["r_m"] = (res_h, res_e)

    def first_block(io: BlockIO, inner: Any, *args: Any, **kwargs: Any) -> Any:
        st = ctx.state(key)
        hidden, encoder = io.get_states(args, kwargs)
        cached = st.get("r_m")
        if st.get("want_reuse") and cached is not None and cached[0].shape == hidden.shape:
            step = ctx.step_index
            prev, prev2 = st.get("r_prev"), st.get("r_prev2")
            w = channel_weights(step, cached[0])
            history = None if w is None else residual_history(
                cached[0], prev[0] if prev is not None else None, prev2[0] if prev2 is not None else None, w.shape[0])
            if history is not None:
                res_h = channel_residual(history, w)
            else:  # scalar linearization (also the fallback when the history is shorter than calibrated)
                a, b = coeffs[step]
                res_h = corrected_residual(cached[0], prev[0] if prev is not None else None, a, b)
            if res_h is not cached[0]:
                stats["corrected_steps"] += 1
            res_e = cached[1]
            st["reused"] = st["skipping"] = True
            st["skipped"] = st.get("skipped", 0) + 1
            stats["skipped_steps"] += 1
            stats["skipped_blocks"] += n_blocks
            new_e = encoder + res_e if (encoder is not None and res_e is not None and res_e.shape == encoder.shape) else encoder
            return io.make_output(hidden + res_h, new_e)
        st["skipping"] = False
        st["computed"] = st.get("computed", 0) + 1
        stats["computed_steps"] += 1
        st["inputs"] = (hidden, encoder)
        out = inner(*args, **kwargs)
        if n_blocks == 1:
            store_residual(io, st, out)
        return out

    def other_block(io: BlockIO, is_last: bool, inner: Any, *args: Any, **kwargs: Any) -> Any:
        st = ctx.state(key)
        if st.get("skipping"):
            return io.pass_through(args, kwargs)  # the residual was added at block 0
        out = inner(*args, **kwargs)
        if is_last and "inputs" in st:
            store_residual(io, st, out)
        return out

    for i, (_, block, io) in enumerate(blocks):
        if i == 0:
            fn = lambda inner, *a, _io=io, **k: first_block(_io, inner, *a, **k)  # noqa: E731
        else:
            fn = lambda inner, *a, _io=io, _last=(i == n_blocks - 1), **k: other_block(_io, _last, inner, *a, **k)  # noqa: E731
        handle.on_remove(wrap_forward(block, fn).remove)
    handle.on_remove(wrap_forward(_base(model), outer).remove)
    return handle
