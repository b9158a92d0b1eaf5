"""Benchmarking: fidelity metrics, timing, FLOPs, the recipe bench runner and plots.

``metrics``, ``timing`` and ``flops`` are light; the runner and plots are imported on first use
(``from diffspeed.bench import run_bench`` works either way).
"""

from __future__ import annotations

from typing import Any

from .flops import flops_per_forward
from .metrics import psnr, rel_error, ssim
from .timing import SyncCounter, TimingResult, count_syncs, peak_memory, time_callable, track_peak_memory

_LAZY = {
    "run_bench": "runner",
    "print_table": "runner",
    "write_json": "runner",
    "to_jsonable": "runner",
    "RestorationError": "runner",
    "REQUIRED_FIELDS": "runner",
    "pareto_plot": "plots",
}

__all__ = [
    "flops_per_forward",
    "psnr",
    "rel_error",
    "ssim",
    "SyncCounter",
    "TimingResult",
    "count_syncs",
    "peak_memory",
    "time_callable",
    "track_peak_memory",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diffspeed.bench' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)
