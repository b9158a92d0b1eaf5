"""Timing, peak memory and host-sync counting.

* :func:`time_callable` - median wall time of a callable. On CUDA each repeat is bracketed by CUDA
  events recorded on the current stream (the device is synchronised before the first repeat and
  once after the last), so the time is what the GPU timeline saw, launch gaps included. On CPU it
  is ``time.perf_counter`` around each repeat. Warm-up calls are never timed.
* :func:`peak_memory` - on CUDA, the peak of ``torch.cuda.max_memory_allocated`` while the callable
  runs, in MiB, **absolute** (weights and everything else already allocated count). On CPU it
  returns ``None``: the process RSS high-water mark only grows, so a per-call delta would be
  misleading.
* :func:`count_syncs` - counts calls that make the host wait for the GPU, by patching
  ``torch.Tensor.item/tolist/cpu/numpy/__bool__/__float__/__int__`` and ``torch.cuda.synchronize``.
  It counts those calls on CPU tensors too (``.cpu()`` only when the tensor is not already on the
  CPU), so a CPU test catches a ``.item()`` that would be a sync on a GPU. On CUDA,
  ``implicit=True`` also turns on ``torch.cuda.set_sync_debug_mode("warn")`` and counts the
  synchronising CUDA ops it reports (e.g. ``nonzero``, boolean masking) in ``.implicit``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch


@dataclass
class TimingResult:
    """Median and every measured repeat, in milliseconds."""

    median_ms: float
    all_ms: list[float] = field(default_factory=list)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.all_ms) if self.all_ms else self.median_ms

    @property
    def min_ms(self) -> float:
        return min(self.all_ms) if self.all_ms else self.median_ms


def _as_device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cpu")
    return device if isinstance(device, torch.device) else torch.device(device)


def time_callable(
    fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 5, device: Any = None
) -> TimingResult:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed; median in ms."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    dev = _as_device(device)
    for _ in range(max(0, warmup)):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        events = []
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(dev)
        times = [float(s.elapsed_time(e)) for s, e in events]
    else:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return TimingResult(median_ms=float(statistics.median(times)), all_ms=times)


@contextlib.contextmanager
def track_peak_memory(device: Any) -> Iterator[dict[str, float | None]]:
    """Context manager: ``result["peak_mb"]`` is the absolute CUDA peak in MiB inside the block
    (``None`` on CPU)."""
    dev = _as_device(device)
    result: dict[str, float | None] = {"peak_mb": None}
    if dev.type != "cuda":
        yield result
        return
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    try:
        yield result
    finally:
        torch.cuda.synchronize(dev)
        result["peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20


def peak_memory(fn: Callable[[], Any], device: Any) -> float | None:
    """Run ``fn()`` once; absolute peak CUDA memory allocated meanwhile in MiB, ``None`` on CPU."""
    with track_peak_memory(device) as result:
        fn()
    return result["peak_mb"]


class SyncCounter:
    """What :func:`count_syncs` counted: ``count`` in total, ``by_kind`` per patched name."""

    def __init__(self) -> None:
        self.by_kind: dict[str, int] = {}
        self.implicit = 0  # synchronising CUDA ops reported by the sync debug mode (CUDA only)

    @property
    def count(self) -> int:
        return sum(self.by_kind.values())

    def _hit(self, kind: str) -> None:
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1

    def __repr__(self) -> str:
        return f"SyncCounter(count={self.count}, by_kind={self.by_kind}, implicit={self.implicit})"


_TENSOR_METHODS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")


@contextlib.contextmanager
def count_syncs(implicit: bool = False) -> Iterator[SyncCounter]:
    """Count GPU -> CPU syncs (see the module docstring). Usage::

        with count_syncs() as syncs:
            model(x)
        assert syncs.count == 0, syncs.by_kind
    """
    counter = SyncCounter()
    saved: list[tuple[Any, str, Any, bool]] = []

    def patch(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        own = name in vars(owner)
        original = vars(owner)[name] if own else getattr(owner, name)
        saved.append((owner, name, original, own))
        setattr(owner, name, make(getattr(owner, name)))

    for name in _TENSOR_METHODS:
        def make(original: Any, _name: str = name) -> Any:
            def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                counter._hit(_name)
                return original(self, *args, **kwargs)

            return wrapper

        patch(torch.Tensor, name, make)

    def make_cpu(original: Any) -> Any:
        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.device.type != "cpu":
                counter._hit("cpu")
            return original(self, *args, **kwargs)

        return wrapper

    patch(torch.Tensor, "cpu", make_cpu)

    def make_sync(original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counter._hit("cuda.synchronize")
            return original(*args, **kwargs)

        return wrapper

    patch(torch.cuda, "synchronize", make_sync)

    debug_prev = None
    catcher = None
    records: list[warnings.WarningMessage] = []
    if implicit and torch.cuda.is_available():
        try:
            debug_prev = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            catcher = warnings.catch_warnings(record=True)
            records = catcher.__enter__()
            warnings.simplefilter("always")
        except Exception:  # noqa: BLE001 - the debug mode is a best-effort extra
            debug_prev = None
    try:
        yield counter
    finally:
        for owner, name, original, own in reversed(saved):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)  # it was inherited (e.g. from torch._C.TensorBase)
        if catcher is not None:
            catcher.__exit__(None, None, None)
            counter.implicit = sum(1 for r in records if "synchroniz" in str(r.message).lower())
        if debug_prev is not None:
            torch.cuda.set_sync_debug_mode(debug_prev)
