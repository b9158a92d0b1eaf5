"""Step-level adaptive reuse (TeaCache / Step Rehash family), with decisions that never sync.

Idea: consecutive denoising steps change the transformer's residual (output of the last block minus
input of the first) only a little for most of the trajectory. When the change is small, skip the
whole block stack and add the previous step's residual to the current input instead; the patch
embedding and the output head still run on the current input, so the step's timestep and latents
are honoured.

The indicator is the relative L1 change of the first block's residual between computed steps
(the cheap signal FirstBlockCache uses; TeaCache uses the modulated input, which needs per-model
polynomial fits). Changes are accumulated over reused steps and compared with ``threshold``; a cap
on consecutive reuses and warm-up / final full steps bound the drift.

How it differs from the peers: the decision for step ``i`` uses the indicator measured at the last
computed step (a lagged estimate: the change rate is smooth along the trajectory). The indicator is
copied to pinned host memory asynchronously when it is produced and read one step later, so the
hot path has no device-to-host sync (diffusers' FirstBlockCache calls ``.item()`` every forward),
and a reused step skips *every* block, the first included. ``handle.stats`` counts the blocks and
steps really skipped.

Optional fidelity guard: ``max_error`` bounds the accumulated estimated error (sum of indicator
values over reused steps since the last full step, each weighted by the reuse count); when it
would be exceeded the step is computed in full.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapters.base import BlockIO, ModelAdapter
from ..context import get_context
from ..errors import DiffspeedError
from ..hooks import wrap_forward
from .base import MethodConfig, MethodHandle, Stage, register_method
from .lagged import LaggedScalar, rel_l1


@dataclass(frozen=True)
class StepCacheConfig(MethodConfig):
    """Reuse the whole block stack's residual on steps whose estimated change is small.

    threshold: accumulated relative L1 change below which a step is reused (higher = faster, lossier).
    max_consecutive: at most this many reused steps in a row.
    warmup_steps: the first steps are always computed (layout forms early).
    final_steps: the last steps are always computed (fine detail forms late); needs a known step count.
    max_error: optional fidelity guard on the accumulated estimated error (None = off).
    """

    method: ClassVar[str] = "step_cache"
    stage: ClassVar[Stage] = Stage.STEP
    incompatible: ClassVar[dict[str, str]] = {}
    compile_note: ClassVar[str] = (
        "the skip decision is host-side Python on a lagged value: compile the blocks, not the decision "
        "(each of the two paths is traced once; no recompiles per step)"
    )

    threshold: float = 0.15
    max_consecutive: int = 3
    warmup_steps: int = 2
    final_steps: int = 1
    max_error: float | None = None

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise DiffspeedError(f"step_cache threshold must be > 0 (e.g. 0.1), got {self.threshold}")
        if self.max_consecutive < 1:
            raise DiffspeedError(f"step_cache max_consecutive must be >= 1, got {self.max_consecutive}")
        if self.warmup_steps < 1:
            raise DiffspeedError(
                f"step_cache warmup_steps must be >= 1 (the first step has nothing to reuse), got {self.warmup_steps}"
            )
        if self.final_steps < 0:
            raise DiffspeedError(f"step_cache final_steps must be >= 0, got {self.final_steps}")
        if self.max_error is not None and not self.max_error > 0:
            raise DiffspeedError(f"step_cache max_error must be > 0 or null, got {self.max_error}")


@register_method(StepCacheConfig)
def apply_step_cache(model: nn.Module, config: StepCacheConfig, adapter: ModelAdapter) -> MethodHandle:
    handle = MethodHandle(model, config)
    blocks = adapter.blocks(model)
    ctx = get_context(model)
    key = f"step_cache@{id(handle)}"
    n_blocks = len(blocks)
    stats = handle.stats
    stats.update({"computed_steps": 0, "skipped_steps": 0, "skipped_blocks": 0})

    def first_block(io: BlockIO, inner: Any, *args: Any, **kwargs: Any) -> Any:
        st = ctx.state(key)
        hidden, encoder = io.get_states(args, kwargs)
        pending = st.pop("pending", None)
        if pending is not None:
            st["last_delta"] = pending.read(stats)
        step, total = ctx.step_index, ctx.num_steps
        in_window = step >= config.warmup_steps and (total is None or step < total - config.final_steps)
        delta = st.get("last_delta")
        skip = False
        if in_window and "residual" in st and delta is not None:
            acc = st["acc"] + delta
            err = st["err"] + delta * (st["consecutive"] + 1)
            skip = acc < config.threshold and st["consecutive"] < config.max_consecutive
            if skip and config.max_error is not None and err > config.max_error:
                skip = False
                stats["guard_refusals"] = stats.get("guard_refusals", 0) + 1
        if skip:
            st["acc"], st["err"] = acc, err
            st["consecutive"] += 1
            st["skipping"] = True
            stats["skipped_steps"] += 1
            stats["skipped_blocks"] += n_blocks
            res_h, res_e = st["residual"]
            new_e = encoder + res_e if (encoder is not None and res_e is not None) else encoder
            return io.make_output(hidden + res_h, new_e)
        st["acc"], st["err"], st["consecutive"], st["skipping"] = 0.0, 0.0, 0, False
        stats["computed_steps"] += 1
        out = inner(*args, **kwargs)
        h_out, _ = io.split_output(out)
        r0 = h_out - hidden
        if "r0" in st:
            st["pending"] = LaggedScalar(rel_l1(r0, st["r0"]))
        st["r0"] = r0
        st["inputs"] = (hidden, encoder)
        if n_blocks == 1:
            _store_residual(io, st, out)
        return out

    def _store_residual(io: BlockIO, st: dict, out: Any) -> None:
        h_out, e_out = io.split_output(out)
        h_in, e_in = st.pop("inputs")
        res_e = e_out - e_in if (e_out is not None and e_in is not None and e_out.shape == e_in.shape) else None
        st["residual"] = (h_out - h_in, res_e)

    def middle_block(io: BlockIO, is_last: bool, inner: Any, *args: Any, **kwargs: Any) -> Any:
        st = ctx.state(key)
        if st.get("skipping"):
            return io.pass_through(args, kwargs)  # the residual was added at block 0
        out = inner(*args, **kwargs)
        if is_last:
            _store_residual(io, st, out)
        return out

    for i, (_, block, io) in enumerate(blocks):
        if i == 0:
            fn = lambda inner, *a, _io=io, **k: first_block(_io, inner, *a, **k)  # noqa: E731
        else:
            fn = lambda inner, *a, _io=io, _last=(i == n_blocks - 1), **k: middle_block(_io, _last, inner, *a, **k)  # noqa: E731
        handle.on_remove(wrap_forward(block, fn).remove)
    return handle
