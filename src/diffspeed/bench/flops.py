"""FLOPs of one model call, counted by ``torch.utils.flop_counter.FlopCounterMode``.

The counter sees the matmul-like ops (linear, matmul, conv, scaled-dot-product attention) and
counts a multiply-add as 2 FLOPs; elementwise work (norms, activations) is not counted. It runs
the call for real (on the model's device), under ``torch.no_grad()``, and prints nothing.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn


def _invoke(model: nn.Module, call: Any) -> Any:
    if isinstance(call, dict):
        return model(**call)
    if isinstance(call, (tuple, list)):
        return model(*call)
    if isinstance(call, torch.Tensor):
        return model(call)
    if not callable(call):
        raise TypeError(f"call must be a callable, a kwargs dict, an args tuple or a tensor; got {type(call).__name__}")
    try:
        params = [
            p for p in inspect.signature(call).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
    except (TypeError, ValueError):
        params = []
    return call(model) if params else call()


def flops_per_forward(model: nn.Module | None, call: Any) -> float:
    """Total FLOPs of one call.

    ``call`` is one of: ``call(model)`` (a callable taking the model), ``call()`` (a callable taking
    nothing), a kwargs dict (``model(**call)``), an args tuple/list (``model(*call)``) or a tensor
    (``model(call)``).
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        _invoke(model, call) if model is not None else call()
    return float(counter.get_total_flops())
