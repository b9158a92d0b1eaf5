"""Per-generation step context that every method reads.

One :class:`StepContext` lives on each transformer (created on first use). It knows the current
step index, the number of steps (when the driver says), the timestep, and the CFG branch of the
current forward call, and it owns per-branch, per-method state dicts so that cond and uncond
caches never mix.

Two ways it is driven:

* **explicit** (diffspeed's sampler, or ``with generation(model, num_steps=...)``): the driver
  calls :meth:`StepContext.begin` and :meth:`StepContext.set_step` before each forward. No
  device-to-host sync is ever needed.
* **auto** (a user's diffusers pipeline calling ``pipe.transformer``): a forward pre-hook reads the
  timestep of each call. A timestep higher than the last one starts a new generation; a repeated
  timestep is the next CFG branch of the same step (pipelines such as Wan call cond, then uncond).
  Reading the timestep costs one tiny device-to-host copy per forward when it lives on the GPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

BRANCHES = ("cond", "uncond", "batched")


@dataclass
class BranchState:
    """State of one CFG branch within a generation."""

    step_index: int = -1
    store: dict[str, dict[str, Any]] = field(default_factory=dict)


class StepContext:
    """Generation state of one transformer. Methods call :meth:`state` for their own dict."""

    def __init__(self) -> None:
        self.generation = 0
        self.num_steps: int | None = None
        self.step_index = -1
        self.timestep: float | None = None
        self.branch = "cond"
        # batched CFG: which rows of the batch are the uncond half ([uncond, cond] concatenation)
        self.cfg_batched = False
        self.explicit = False
        self.calls_this_step = 0
        self._branches: dict[str, BranchState] = {}

    # ---- driver side ---------------------------------------------------------------------
    def begin(self, num_steps: int | None = None, explicit: bool = True) -> None:
        """Start a new generation: clears every method's state; ``num_steps`` may change freely."""
        if num_steps is not None and num_steps <= 0:
            raise ValueError(f"num_steps must be positive, got {num_steps}")
        self.generation += 1
        self.num_steps = num_steps
        self.step_index = -1
        self.timestep = None
        self.branch = "cond"
        self.cfg_batched = False
        self.explicit = explicit
        self.calls_this_step = 0
        self._branches.clear()

    def set_step(self, step_index: int, timestep: float | None, branch: str = "cond") -> None:
        """Declare the step and branch of the next forward (explicit mode)."""
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
        if step_index != self.step_index:
            self.calls_this_step = 0
        self.step_index = step_index
        self.timestep = timestep
        self.branch = branch
        self.cfg_batched = branch == "batched"
        self._branch_state().step_index = step_index

    def observe_call(self, timestep: torch.Tensor | float | None) -> None:
        """Auto mode: infer step / branch / new generation from the call's timestep."""
        if self.explicit:
            self.calls_this_step += 1
            return
        if timestep is None:
            t = None
        elif isinstance(timestep, torch.Tensor):
            t = float(timestep.reshape(-1)[0].item())  # one scalar sync in auto mode (documented)
        else:
            t = float(timestep)
        if self.timestep is None or t is None or self.step_index < 0:
            if self.step_index < 0 and self.generation == 0:
                self.begin(None, explicit=False)
            new_step = True
        elif t > self.timestep + 1e-9:
            self.begin(self.num_steps, explicit=False)  # timestep went up: a new request
            new_step = True
        elif abs(t - self.timestep) <= 1e-9:
            new_step = False
        else:
            new_step = True
        if new_step:
            self.step_index += 1
            self.calls_this_step = 0
            self.branch = "cond"
        else:
            self.calls_this_step += 1
            self.branch = "uncond" if self.calls_this_step == 1 else f"extra{self.calls_this_step}"
        if self.num_steps is not None and self.step_index >= self.num_steps:
            # more steps than declared: treat as a new generation rather than index past the end
            self.begin(self.num_steps, explicit=False)
            self.step_index = 0
        self.timestep = t
        self._branch_state().step_index = self.step_index

    # ---- method side ---------------------------------------------------------------------
    def _branch_state(self) -> BranchState:
        bs = self._branches.get(self.branch)
        if bs is None:
            bs = self._branches[self.branch] = BranchState()
        return bs

    def state(self, key: str) -> dict[str, Any]:
        """The calling method's state dict for the current branch (fresh each generation)."""
        return self._branch_state().store.setdefault(key, {})

    def branch_states(self, key: str) -> dict[str, dict[str, Any]]:
        """All branches' state dicts for ``key`` (for tests and stats)."""
        return {b: s.store[key] for b, s in self._branches.items() if key in s.store}

    @property
    def progress(self) -> float | None:
        """Fraction of the generation done, in [0, 1), when the number of steps is known."""
        if self.num_steps is None or self.step_index < 0:
            return None
        return self.step_index / self.num_steps

    def __repr__(self) -> str:
        return (
            f"StepContext(gen={self.generation}, step={self.step_index}/{self.num_steps}, "
            f"t={self.timestep}, branch={self.branch!r}, explicit={self.explicit})"
        )


_ATTR = "_diffspeed_context"


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def get_context(model: nn.Module) -> StepContext:
    """The transformer's context, created (with its auto-mode pre-hook) on first use."""
    base = _base(model)
    ctx = base.__dict__.get(_ATTR)
    if ctx is None:
        ctx = StepContext()
        object.__setattr__(base, _ATTR, ctx)
        from .adapters.base import get_adapter

        try:
            adapter = get_adapter(base)
        except Exception:  # noqa: BLE001 - a context without an adapter is still usable explicitly
            adapter = None

        def _pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            ts = adapter.timestep_from_call(args, kwargs) if adapter is not None else kwargs.get("timestep")
            ctx.observe_call(ts)

        handle = base.register_forward_pre_hook(_pre_hook, with_kwargs=True)
        object.__setattr__(base, "_diffspeed_context_hook", handle)
    return ctx


@contextlib.contextmanager
def generation(model: nn.Module, num_steps: int | None = None) -> Iterator[StepContext]:
    """Declare a generation around a user's own loop or pipeline call.

    With ``num_steps`` the context knows the schedule length (methods with warm-up or step
    schedules need it). Step indices are still inferred from timesteps unless the caller uses
    :meth:`StepContext.set_step`.
    """
    ctx = get_context(model)
    ctx.begin(num_steps, explicit=False)
    try:
        yield ctx
    finally:
        ctx.explicit = False
