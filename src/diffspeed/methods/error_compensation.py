"""``error_compensation``: per-step affine correction of a quantized model's velocity.

Applies the table fitted by :func:`diffspeed.quant.compensation.calibrate_compensation`: at step ``i``
the transformer output becomes ``a_i[c] * out + b_i[c]`` per latent channel ``c`` (one fused
multiply-add). The correction is affine with weights summing to one under CFG, so correcting every
branch's output equals correcting the guided velocity; no guidance scale is needed here.

The step index comes from the model's :class:`~diffspeed.context.StepContext` (host-side ints; the
per-step coefficient tensors are built on the device at apply time, so the hot path never syncs).
The table is refused for another model class/config at apply time and for another step count at the
first forward of a generation. Output layouts handled: channel axis 1 (DiT, PixArt, SD3, Wan; only the
first ``C`` channels of learned-sigma outputs), axis 2 of 5-D outputs (CogVideoX) and Flux's packed
``(B, L, 4C)`` tokens. Reversible: ``remove()`` restores bit-identical outputs.
``handle.stats["steps_corrected"]`` counts corrected forward calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..adapters.base import ModelAdapter
from ..context import get_context
from ..errors import DiffspeedError
from ..hooks import output_tensor, wrap_forward
from .base import MethodConfig, MethodHandle, Stage, register_method


@dataclass(frozen=True)
class ErrorCompensationConfig(MethodConfig):
    """Correct a quantized model's velocity per step with a calibrated per-channel affine.

    table: path of the JSON written by ``calibrate_compensation(...).save(path)`` for this model and step count.
    """

    method: ClassVar[str] = "error_compensation"
    stage: ClassVar[Stage] = Stage.WEIGHTS  # belongs with the quantization it compensates
    compile_note: ClassVar[str] = (
        "the step index is a host-side int and the coefficients are per-step device tensors: compile the "
        "transformer's blocks, the wrapper adds one multiply-add"
    )

    table: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.table, str) or not self.table.strip():
            raise DiffspeedError(
                "error_compensation needs `table`: the path of a compensation JSON; create one with "
                "diffspeed.quant.compensation.calibrate_compensation(full, quantized, ...).save('comp.json')"
            )


def _correctors(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, c: int, frames_first: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function applying the step's (C,) ``a``/``b`` to a transformer output of this layout."""
    nd = out.dim()
    if not frames_first and out.shape[1] in (c, 2 * c) and nd in (4, 5):
        view = (1, c) + (1,) * (nd - 2)
        av, bv = a.reshape(view), b.reshape(view)
        if out.shape[1] == c:
            return lambda o: torch.addcmul(bv, av, o)
        return lambda o: torch.cat([torch.addcmul(bv, av, o[:, :c]), o[:, c:]], dim=1)  # learned sigma
    if nd == 5 and out.shape[2] == c:  # CogVideoX: (B, F, C, H, W)
        view = (1, 1, c, 1, 1)
        av, bv = a.reshape(view), b.reshape(view)
        return lambda o: torch.addcmul(bv, av, o)
    if nd == 3 and out.shape[-1] == 4 * c:  # Flux packed tokens: (B, L, C * 2 * 2), channel-major
        av, bv = a.repeat_interleave(4), b.repeat_interleave(4)
        return lambda o: torch.addcmul(bv, av, o)
    raise DiffspeedError(
        f"error_compensation cannot find the {c} latent channels in a transformer output of shape "
        f"{tuple(out.shape)}; the table was calibrated for a model with {c} latent channels"
    )


def _map_sample(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return type(out)([fn(out[0]), *out[1:]])
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        out.sample = fn(sample)
        return out
    raise DiffspeedError(
        f"error_compensation cannot find the prediction in a transformer output of type {type(out).__name__}; "
        "expected a tensor, a tuple whose first item is the prediction, or an object with `.sample`"
    )


def _first_tensor(out: Any) -> torch.Tensor:
    y = output_tensor(out)
    if y is not None:
        return y
    raise DiffspeedError(f"error_compensation cannot find the prediction in an output of type {type(out).__name__}")


@register_method(ErrorCompensationConfig)
def apply_error_compensation(model: nn.Module, config: ErrorCompensationConfig, adapter: ModelAdapter) -> MethodHandle:
    from ..quant.compensation import CompensationTable

    table = CompensationTable.load(config.table)
    table.check_model(model, source=config.table)
    handle = MethodHandle(model, config)
    ctx = get_context(model)
    key = f"error_compensation@{id(handle)}"
    n, c = table.num_steps, table.latent_channels
    a_all, b_all = table.tensors("cpu", torch.float64)
    # per (device, dtype, layout): list of per-step correctors, built once (no per-step allocation or sync)
    cache: dict[tuple, list[Callable[[torch.Tensor], torch.Tensor]]] = {}
    stats = handle.stats
    stats["steps_corrected"] = 0
    base = getattr(model, "_orig_mod", model)
    frames_first = type(base).__name__.startswith("CogVideoX")  # its output is (B, F, C, H, W)

    def correctors_for(out: torch.Tensor) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        sig = (out.device, out.dtype, out.dim(), tuple(out.shape[1:3]), out.shape[-1])
        fns = cache.get(sig)
        if fns is None:
            a_dev = a_all.to(device=out.device, dtype=out.dtype)
            b_dev = b_all.to(device=out.device, dtype=out.dtype)
            fns = cache[sig] = [_correctors(a_dev[i], b_dev[i], out, c, frames_first) for i in range(n)]
        return fns

    def outer(inner: Any, *args: Any, **kwargs: Any) -> Any:
        st = ctx.state(key)
        if not st.get("checked"):  # first forward of this branch in this generation
            table.check_steps(ctx.num_steps, config.table)
            st["checked"] = True
        out = inner(*args, **kwargs)
        step = ctx.step_index
        if not 0 <= step < n:
            raise DiffspeedError(
                f"error_compensation got step {step} outside the table's {n} steps; generate with {n} steps"
            )
        fn = correctors_for(_first_tensor(out))[step]
        stats["steps_corrected"] += 1
        return _map_sample(out, fn)

    handle.on_remove(wrap_forward(base, outer).remove)
    return handle
