"""Block-level reuse (DBCache family), with optional TaylorSeer forecasting and sync-free decisions.

Idea (DBCache, "Dual Block Cache", from cache-dit): split the flattened block list (Flux: double then
single blocks) into ``front_blocks`` (Fn) that always run, a middle that may be reused, and
``back_blocks`` (Bn) that always run. The Fn blocks' output residual (Fn output hidden minus block-0
input hidden) is a cheap probe of how much this step differs from the last computed one: its
relative L1 change since the last computed step is the *indicator*. When it is below ``threshold``
the middle blocks are skipped (pass-through wrappers) and the middle residual cached at the last
computed step (middle output minus middle input, hidden and encoder states where the block returns
them) is added to the current middle input; the Bn blocks then run on that and refine it. Unlike a
step-level cache (``step_cache``), the current step's inputs always flow through real blocks at
both ends, so higher thresholds stay usable.

TaylorSeer ("From Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers", Liu et
al. 2025): with ``taylor_order`` 1 or 2 a reused step does not add the stale residual but a
forecast ``r(k) ~= D0 + D1 (k-m) + D2 (k-m)^2 / 2`` (``m`` = last computed step). The derivative
estimates are finite differences updated at every computed step, as TaylorSeer does:
``D0 = r_m``, ``D(i+1) = (Di_new - Di_old) / (m - m')``. They appear progressively (order 1 needs 2
computed steps, order 2 needs 3); before that plain reuse is used.

The indicator. ``d_k = |r_k - r_m|_1 / |r_m|_1`` with ``r`` the Fn residual and ``m`` the last
computed step: the change accumulated since the last full compute, measured directly against the
reference (as cache-dit does) rather than as a sum of step-to-step changes, which over-counts noise.
The Fn blocks run at every step, so every step also measures its step-to-step rate
``s_k = |r_k - r_{k-1}|_1 / |r_{k-1}|_1``: a value one step old always exists.

Decision timing (the part that differs most from the peers). cache-dit and diffusers' caches call
``.item()`` on the indicator every forward, so the host waits for the device at every step and
the launch queue drains. Here both values are copied asynchronously to pinned host memory
(:class:`~diffspeed.methods.lagged.LaggedScalar`) and:

* ``decision="auto"`` (default): if the *current* ``d_k`` is already on the host (``event.query()``,
  no waiting) it is used: the exact DBCache decision. That is the case when the host is not ahead of
  the device (CPU; small, launch-bound models). Otherwise the lagged estimate
  ``d_{k-1} + s_{k-1}`` is used (``d_{k-1}`` = 0 when step ``k-1`` was computed): the drift already
  accumulated, measured one step ago, plus one more step at the latest rate. It is exact for a steady
  drift and, by the triangle inequality, an upper bound of ``d_k`` while the rate is steady, so the
  lag errs toward computing. Why this choice: where the host runs ahead (large, GPU-bound models)
  waiting for the current value would drain the launch queue, which is the very overlap that makes a
  step fast, and a one-step-old rate is a good estimate (the drift is smooth along a trajectory);
  where the host is not ahead the exact value is free, so take it. Cost: on CUDA the schedule can
  depend on timing, so two runs of one seed may differ slightly; ``decision="lagged"`` gives
  bit-reproducible schedules. ``stats`` counts ``decisions_current`` and ``decisions_lagged``.
* ``decision="lagged"``: always the lagged estimate: deterministic on every device. Its values were
  produced a whole step earlier, so reading them almost never waits (a wait is counted in
  ``host_waits``).

Other differences from cache-dit/diffusers: no ``.item()`` per step; state is per CFG branch
(:meth:`~diffspeed.context.StepContext.state`), so pipelines that call cond and uncond as separate
forwards (Wan, ...) keep separate caches, while batched CFG ([uncond, cond] in one batch) simply
works on the whole batch; ``handle.stats`` counts the blocks really not executed.

Speed / quality knobs: ``threshold`` (higher = more reuse), ``front_blocks`` (more = better
indicator, less saving), ``back_blocks`` (more = the reused residual is refined more, less saving),
``max_consecutive``, ``warmup_steps``, ``final_steps``, ``taylor_order`` (forecast instead of plain
reuse: better fidelity at the same schedule), ``max_error`` (optional guard: the sum of indicator
values over the reused steps since the last full compute, the same estimate ``step_cache`` uses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from ..adapters.base import BlockIO, ModelAdapter
from ..context import get_context
from ..errors import DiffspeedError, IncompatibleMethodsError
from ..hooks import wrap_forward
from .base import MethodConfig, MethodHandle, Stage, applied_methods, register_method
from .lagged import LaggedScalar, rel_l1

DECISIONS = ("auto", "lagged")


def _check_int(name: str, value: Any, minimum: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DiffspeedError(f"block_cache {name} must be an integer >= {minimum}{hint}, got {value!r}")


@dataclass(frozen=True)
class BlockCacheConfig(MethodConfig):
    """Reuse (or forecast) the middle blocks' residual when the front blocks' residual barely changed.

    threshold: relative L1 change of the front blocks' residual since the last computed step below
        which the middle blocks are reused (higher = faster, lossier).
    front_blocks: first blocks always computed; their residual is the change indicator (Fn).
    back_blocks: last blocks always computed; they refine the reused residual (Bn).
    max_consecutive: at most this many reused steps in a row.
    warmup_steps: the first steps are always computed.
    final_steps: the last steps are always computed; needs a known step count.
    max_error: optional fidelity guard on the accumulated estimated error (None = off).
    taylor_order: 0 = plain reuse; 1 or 2 = TaylorSeer forecast of the middle residual.
    decision: "auto" (the current step's indicator when it is on the host without waiting, else the
        lagged estimate from the previous step) or "lagged" (always the lagged estimate: schedules are
        reproducible on every device).
    """

    method: ClassVar[str] = "block_cache"
    stage: ClassVar[Stage] = Stage.BLOCK
    incompatible: ClassVar[dict[str, str]] = {
        "step_cache": (
            "both decide which steps reuse the block stack (a step skipped whole by step_cache never reaches "
            "block_cache's front blocks, so their schedules and cached residuals go stale); use one of them"
        ),
    }
    compile_note: ClassVar[str] = (
        "the reuse decision is host-side Python in the block wrappers (excluded from tracing with "
        "torch.compiler.disable: one graph break per forward at the decision); under whole-model compile Dynamo "
        "also re-specializes the shared wrapper per block and per path (compute / reuse) and can hit its "
        "recompile limit, falling back to eager for the wrapper frames (outputs unchanged). Under CUDA graphs the "
        "cached residuals must not live in graph-owned output buffers"
    )

    threshold: float = 0.08
    front_blocks: int = 1
    back_blocks: int = 0
    max_consecutive: int = 3
    warmup_steps: int = 2
    final_steps: int = 1
    max_error: float | None = None
    taylor_order: int = 0
    decision: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not self.threshold > 0:
            raise DiffspeedError(f"block_cache threshold must be > 0 (e.g. 0.08), got {self.threshold!r}")
        _check_int("front_blocks", self.front_blocks, 1, " (the front blocks' residual is the change indicator)")
        _check_int("back_blocks", self.back_blocks, 0)
        _check_int("max_consecutive", self.max_consecutive, 1)
        _check_int("warmup_steps", self.warmup_steps, 1, " (the first step has nothing to reuse)")
        _check_int("final_steps", self.final_steps, 0)
        if self.max_error is not None and (isinstance(self.max_error, bool) or not self.max_error > 0):
            raise DiffspeedError(f"block_cache max_error must be > 0 or null, got {self.max_error!r}")
        if isinstance(self.taylor_order, bool) or self.taylor_order not in (0, 1, 2):
            raise DiffspeedError(
                "block_cache taylor_order must be 0 (plain reuse), 1 or 2 (TaylorSeer forecast), "
                f"got {self.taylor_order!r}"
            )
        if self.decision not in DECISIONS:
            raise DiffspeedError(
                f"block_cache decision must be one of {DECISIONS} ('lagged' for reproducible schedules), "
                f"got {self.decision!r}"
            )


class _Indicator(NamedTuple):
    """What one step measured on the Fn residual, as async host copies."""

    drift: LaggedScalar | None  # d: rel L1 change vs the last computed step's Fn residual
    rate: LaggedScalar | None  # s: rel L1 change vs the previous step's Fn residual, per step
    step: int  # step it was measured at
    ref_step: int | None  # the last computed step at that time (reference of ``drift``)


def _is_ready(scalar: LaggedScalar) -> bool:
    """True when the value is on the host without waiting (a module function so tests can force lag)."""
    return scalar.event is None or bool(scalar.event.query())


def _taylor_update(
    old: list[torch.Tensor] | None, new: torch.Tensor | None, window: int, order: int
) -> list[torch.Tensor] | None:
    """TaylorSeer's finite differences: [r, dr, d2r] from the new residual and the previous estimates."""
    if new is None:
        return None
    derivs = [new]
    if old is not None and order > 0 and window > 0 and old[0].shape == new.shape:
        for i in range(min(order, len(old))):
            derivs.append((derivs[i] - old[i]) / window)
    return derivs


def _taylor_eval(derivs: list[torch.Tensor] | None, elapsed: int) -> torch.Tensor | None:
    if derivs is None:
        return None
    out = derivs[0]
    for i in range(1, len(derivs)):
        out = torch.add(out, derivs[i], alpha=elapsed**i / math.factorial(i))
    return out


@register_method(BlockCacheConfig)
def apply_block_cache(model: nn.Module, config: BlockCacheConfig, adapter: ModelAdapter) -> MethodHandle:
    blocks = adapter.blocks(model)
    n_blocks = len(blocks)
    fn, bn = config.front_blocks, config.back_blocks
    if fn + bn >= n_blocks:
        raise DiffspeedError(
            f"block_cache needs at least one middle block to reuse, but front_blocks={fn} + back_blocks={bn} "
            f">= the {n_blocks} blocks of this {type(getattr(model, '_orig_mod', model)).__name__}; "
            f"use front_blocks + back_blocks <= {n_blocks - 1}"
        )
    for other, reason in config.incompatible.items():
        if other in applied_methods(model):
            raise IncompatibleMethodsError(f"'block_cache' cannot be combined with {other!r}: {reason}")

    handle = MethodHandle(model, config)
    ctx = get_context(model)
    key = f"block_cache@{id(handle)}"
    mid_first, mid_last = fn, n_blocks - bn - 1
    n_mid = mid_last - mid_first + 1
    stats = handle.stats
    stats.update({
        "computed_steps": 0, "reused_steps": 0, "skipped_blocks": 0, "forecast_steps": 0,
        "guard_refusals": 0, "decisions_current": 0, "decisions_lagged": 0, "host_waits": 0,
    })

    def in_window(step: int) -> bool:
        total = ctx.num_steps
        return step >= config.warmup_steps and (total is None or step < total - config.final_steps)

    def estimate(st: dict, current: _Indicator, step: int, ref_step: int) -> float | None:
        """The drift since the last computed step, for this step's decision, without waiting when avoidable."""
        if config.decision == "auto" and current.drift is not None and _is_ready(current.drift):
            stats["decisions_current"] += 1
            return current.drift.read(stats)
        # lagged: what the previous step measured (produced a whole step ago, normally already on the host)
        prev: _Indicator | None = st.get("prev_ind")
        if prev is None or prev.rate is None or not prev.step < step:
            return None
        if prev.step == ref_step:  # the previous step was computed: no drift accumulated yet
            acc = 0.0
        elif prev.ref_step == ref_step and prev.drift is not None:  # it was reused: its drift vs the same reference
            acc = prev.drift.read(stats)
        else:
            return None
        stats["decisions_lagged"] += 1
        # accumulated drift + the latest step-to-step rate: exact for a steady drift, and by the triangle
        # inequality an upper bound of the true drift while the rate is steady (errs toward computing)
        return acc + prev.rate.read(stats) * (step - prev.step)

    @torch.compiler.disable  # host-side bookkeeping: a graph break here, no guards on the cache state
    def decide(st: dict, io: BlockIO, out: Any) -> None:
        """After the Fn blocks: measure the indicator, decide reuse for the rest of this forward."""
        h_out, _ = io.split_output(out)
        in0 = st.pop("in0", None)
        step = ctx.step_index
        residual = h_out - in0 if in0 is not None and in0.shape == h_out.shape else None
        ref = st.get("ref")  # (Fn residual, step) of the last computed step
        last = st.get("last")  # (Fn residual, step) of the previous forward of this branch
        drift = rate = None
        if residual is not None:
            if ref is not None and ref[0].shape == residual.shape and ref[1] < step:
                drift = LaggedScalar(rel_l1(residual, ref[0]))
            if last is not None and last[0].shape == residual.shape and last[1] < step:
                rate = LaggedScalar(rel_l1(residual, last[0]) / (step - last[1]))
        current = _Indicator(drift, rate, step, ref[1] if ref is not None else None)
        cache = st.get("mid")
        reuse = False
        if (
            drift is not None
            and cache is not None
            and cache["h"][0].shape == h_out.shape
            and in_window(step)
            and st["consecutive"] < config.max_consecutive
        ):
            value = estimate(st, current, step, ref[1])
            if value is not None and value < config.threshold:
                err = st["err"] + value
                if config.max_error is not None and err > config.max_error:
                    stats["guard_refusals"] += 1
                else:
                    reuse = True
                    st["err"] = err
        st["prev_ind"] = current
        st["last"] = (residual, step) if residual is not None else None
        st["reuse"] = reuse
        if reuse:
            st["consecutive"] += 1
            stats["reused_steps"] += 1
            stats["skipped_blocks"] += n_mid
            if config.taylor_order > 0 and len(cache["h"]) > 1:
                stats["forecast_steps"] += 1
        else:
            st["consecutive"], st["err"] = 0, 0.0
            stats["computed_steps"] += 1
            if residual is not None:
                st["ref"] = (residual, step)
            else:
                st.pop("ref", None)

    def reused_input(st: dict, hidden: torch.Tensor, encoder: torch.Tensor | None):
        cache = st["mid"]
        elapsed = ctx.step_index - cache["step"]
        res_h = _taylor_eval(cache["h"], elapsed)
        res_e = _taylor_eval(cache["e"], elapsed)
        add_e = encoder is not None and res_e is not None and res_e.shape == encoder.shape
        new_e = encoder + res_e if add_e else encoder
        return hidden + res_h, new_e

    def store_middle(st: dict, io: BlockIO, out: Any) -> None:
        h_out, e_out = io.split_output(out)
        h_in, e_in = st.pop("mid_in")
        res_h = h_out - h_in
        res_e = e_out - e_in if (e_out is not None and e_in is not None and e_out.shape == e_in.shape) else None
        step = ctx.step_index
        old = st.get("mid")
        window = step - old["step"] if old is not None else 0
        st["mid"] = {
            "step": step,
            "h": _taylor_update(old["h"] if old else None, res_h, window, config.taylor_order),
            "e": _taylor_update(old["e"] if old else None, res_e, window, config.taylor_order),
        }

    def wrapper(i: int, io: BlockIO, inner: Any, *args: Any, **kwargs: Any) -> Any:
        st = ctx.state(key)
        if i < mid_first:  # front blocks: always run; the last of them decides
            if i == 0:
                st.setdefault("consecutive", 0)
                st.setdefault("err", 0.0)
                st["in0"] = io.get_states(args, kwargs)[0]
                st["reuse"] = False
            out = inner(*args, **kwargs)
            if i == mid_first - 1:
                decide(st, io, out)
            return out
        # middle blocks (the Bn blocks are not wrapped)
        if st.get("reuse"):
            hidden, encoder = io.get_states(args, kwargs)
            if i == mid_first:
                hidden, encoder = reused_input(st, hidden, encoder)
            return io.make_output(hidden, encoder)  # pass-through: the residual was added at the first one
        if i == mid_first:
            st["mid_in"] = io.get_states(args, kwargs)
        out = inner(*args, **kwargs)
        if i == mid_last and "mid_in" in st:
            store_middle(st, io, out)
        return out

    for i, (_, block, io) in enumerate(blocks[: mid_last + 1]):
        fn_wrap = lambda inner, *a, _i=i, _io=io, **k: wrapper(_i, _io, inner, *a, **k)  # noqa: E731
        handle.on_remove(wrap_forward(block, fn_wrap).remove)
    return handle
