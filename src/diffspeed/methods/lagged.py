"""Sync-free reading of device scalars for cache decisions.

A cache decides on the host whether to skip work; the signal it decides on (a relative change of
some residual) is computed on the device. Reading it at once (``.item()``) stalls the CPU until the
GPU catches up, every step. Instead the value is copied to pinned host memory asynchronously when it
is produced and read one step later, when the GPU has long finished it: the decision is lagged by
one computed step, and the hot path never waits.
"""

from __future__ import annotations

import torch


class LaggedScalar:
    """A device scalar copied to host asynchronously; read one step later without stalling."""

    def __init__(self, value: torch.Tensor) -> None:
        if value.is_cuda:
            self.host = torch.empty((), dtype=torch.float32, pin_memory=True)
            self.host.copy_(value.detach().float(), non_blocking=True)
            self.event: torch.cuda.Event | None = torch.cuda.Event()
            self.event.record()
        else:
            self.host = value.detach().float()
            self.event = None

    def read(self, stats: dict[str, float]) -> float:
        if self.event is not None and not self.event.query():
            stats["host_waits"] = stats.get("host_waits", 0) + 1  # rare: the GPU is > 1 step behind
            self.event.synchronize()
        return float(self.host)


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().mean() / b.abs().mean().clamp_min(1e-12)


