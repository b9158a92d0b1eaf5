"""Shared plumbing of the ``benchmarks/*.py`` scripts: the once-only finish + hard-limit watchdog, and
SDPA backend probing. Rows are written with :func:`diffspeed.bench.runner.write_json`."""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

import torch

_SDPA_NAMES = {"FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient", "CUDNN_ATTENTION": "cudnn",
               "MATH": "math", "ERROR": "none"}


def fmt(value: Any, spec: str) -> str:
    """``format(value, spec)``; ``-`` for None, ``str(value)`` where the spec does not apply."""
    if value is None:
        return "-"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def device_and_dtype(device: str | None, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``--device`` (default cuda when available) and ``--dtype`` (auto: bf16 on CUDA, fp32 on CPU)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


class Budget:
    """Seconds from ``t0`` (the process start) in which new rows may start; ``truncated`` once one was refused."""

    def __init__(self, budget_s: float, t0: float) -> None:
        self.budget_s = budget_s
        self.t0 = t0
        self.truncated = False
        self.skipped: list[str] = []
        self.last_row_s = 0.0

    def allows(self, what: str, estimate_s: float | None = None) -> bool:
        """Whether ``what`` (estimated 1.5x the last row unless ``estimate_s``) still fits; records a refusal."""
        est = self.last_row_s * 1.5 if estimate_s is None else estimate_s
        if time.perf_counter() - self.t0 + est > self.budget_s:
            self.truncated = True
            self.skipped.append(what)
            return False
        return True


def record_drift(full: dict[str, Any], gen: Callable[[], Any], repeats: int, device: torch.device) -> None:
    """Time the full model's generation ``gen`` again after the rows: how much the machine drifted while
    they were measured (``latency_end_ms``, ``drift_pct`` and, past 5 %, a note in the ``full`` row)."""
    from .timing import time_callable

    end_ms = time_callable(gen, warmup=0, repeats=repeats, device=device).median_ms
    full["latency_end_ms"] = end_ms
    full["drift_pct"] = 100.0 * (end_ms / full["latency_ms"] - 1.0)
    if abs(full["drift_pct"]) > 5:
        full["notes"].append(f"full model latency {full['drift_pct']:+.1f}% at the end of the rows vs the "
                             "start: speedups carry that much uncertainty")


def once(fn: Callable[[bool], Any]) -> Callable[[bool], bool]:
    """``fn(truncated)`` callable from the main thread or the watchdog; runs only the first time (True then)."""
    lock = threading.Lock()
    done = [False]

    def wrapper(truncated: bool) -> bool:
        with lock:
            if done[0]:
                return False
            done[0] = True
        fn(truncated)
        return True

    return wrapper


def command_meta(script: str, argv: list[str] | None) -> dict[str, Any]:
    """The command line that produced a result file (``argv`` None: this process's), with torch's version."""
    import shlex
    import sys

    args = argv if argv is not None else sys.argv[1:]
    return {"command": " ".join(["python", script, *map(shlex.quote, args)]), "torch": torch.__version__}


def budget_finisher(budget: "Budget", write: Callable[[], Any], *, plot: Callable[[], Any] | None,
                     table: Callable[[], Any], summary: Callable[[], dict[str, Any]],
                     log: Callable[[str], None], json_default: Callable[[Any], Any] = str) -> Callable[[bool], bool]:
    """The once-only end of a budgeted benchmark (main thread or watchdog): mark the budget truncated
    when asked, write the rows, draw the plot (a failed plot is logged, the numbers still count), print
    the table, and always print the JSON summary line."""
    import json

    @once
    def finish(truncated: bool) -> None:
        if truncated:
            budget.truncated = True
        try:
            write()
            if plot is not None:
                try:
                    plot()
                except Exception as exc:  # noqa: BLE001 - the numbers matter more than the picture
                    log(f"plot failed: {type(exc).__name__}: {exc}")
            table()
        finally:
            print(json.dumps(summary(), allow_nan=False, default=json_default), flush=True)

    return finish


def start_watchdog(hard_limit_s: float, t0: float, finish: Callable[[bool], bool],
                   log: Callable[[str], None]) -> threading.Timer:
    """At ``t0 + hard_limit_s`` call ``finish(True)`` (a :func:`once` wrapper) and exit the process with 0."""

    def fire() -> None:
        log(f"hard limit {hard_limit_s:.0f} s reached: writing what was measured and exiting")
        if finish(True):
            os._exit(0)

    timer = threading.Timer(max(1.0, hard_limit_s - (time.perf_counter() - t0)), fire)
    timer.daemon = True
    timer.start()
    return timer


def sdpa_backends() -> list[tuple[str, Any]]:
    """(short name, SDPBackend member) for flash, efficient, cuDNN, math - those this torch has."""
    from torch.nn.attention import SDPBackend

    return [(short, getattr(SDPBackend, n)) for n, short in _SDPA_NAMES.items()
            if n != "ERROR" and hasattr(SDPBackend, n)]


def sdpa_backend_name(backend: Any) -> str:
    return _SDPA_NAMES.get(getattr(backend, "name", str(backend)), str(backend).lower())


def sdpa_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """Which backend SDPA picks for these tensors under the current backend flags."""
    from torch.nn.attention import SDPBackend

    try:
        choice = int(torch._fused_sdp_choice(q, k, v))
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({type(exc).__name__})"
    for member in SDPBackend.__members__.values():
        if int(member) == choice:
            return sdpa_backend_name(member)
    return f"unknown ({choice})"
