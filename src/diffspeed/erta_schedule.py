"""ERTACache schedules chosen by measured reuse cost instead of a residual-change threshold.

Why: the threshold rule of :func:`diffspeed.calibrate.build_schedule` reuses the steps whose
transformer residual *changes* least, a proxy. What a user pays for a reused step is the error it
leaves in the final output, and the two differ: an early reuse is amplified by every later step, a
late one is not, and a step whose residual changes a little may still be one where the velocity
matters most. The ERTACache paper profiles the reuse error of candidate policies; this module does
the single-step version of that: for every step ``c`` that may be reused, it restarts the *full*
model's trajectory at step ``c`` (all calibration samples in one batch), reuses the previous step's
residual there, computes every later step in full, and records the mean squared error of the final
latents against the full model's (``reuse_costs``). :func:`pick_schedule` then reuses the ``K``
cheapest steps, subject to the cap on consecutive reuses.

What it buys, measured (``benchmarks/results/erta_schedule_cpu.json``, reference image model, 25
steps, CPU fp32, 8 evaluation seeds): exact control of the reuse count (the threshold rule's
schedules jump, e.g. from 14 to 16 reused steps), but **not** better fidelity at equal reuse: +0.8 dB
at 14 reused steps, -3.9 dB at 15, and 31.8 dB at 16 where two thresholds gave 33.1 and 31.2 dB.
A greedy search (each step re-simulated on top of those already chosen, twice the calibration time)
chose the same schedules as the ranking (the ``greedy`` rows of that file) and was removed. The cost
being ranked is that of *plain* reuse; the residual correction and timestep adjustment fitted
afterwards change which steps are cheap. Pricing each step with the corrections fitted for it alone
was tried on the same setup and was worse at every K, so it is not offered either; a search over
whole corrected schedules was not tried.

Cost: one forward per remaining step for each candidate, ``sum(n - c)`` batched forwards (about
``n^2 / 2``; 275 at 25 steps), on top of the threshold calibration's profiling. Interactions between
reused steps (two neighbours reused together) are not modelled; the residual correction and timestep
adjustment fitted afterwards on the chosen schedule see them, and validation keeps a correction only
if it lowers the final error. Memory: every full-model residual of the calibration trajectories is
kept, in host memory (:func:`offload`), and moved to the device one step at a time.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .errors import DiffspeedError


class CalibrationBatch:
    """All calibration samples as one batch, laid out as :meth:`_Runner.velocity` expects: latents
    ``[S, ...]``, and with CFG the model kwargs as ``[uncond of every sample, cond of every sample]``."""

    def __init__(self, run: Any, labels: Sequence[int]) -> None:
        from .sampler import _cat_kwargs

        cond = run.loaded.make_condition(list(labels), run.device)
        self.kwargs = _cat_kwargs(cond.uncond, cond.cond) if run.use_cfg else cond.cond


def _stack_states(states: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(states), dim=0)


def offload(t: torch.Tensor | None) -> torch.Tensor | None:
    """Where stored residuals live between uses: host memory. They are a full hidden state per step,
    sample and CFG branch (FLUX at 4096 tokens: ~100 MB each, ~10 GB for 25 steps x 4 samples)."""
    return None if t is None else t.detach().to("cpu")


def _stack_residuals(per_sample: Sequence[torch.Tensor | None], use_cfg: bool,
                     device: torch.device | None = None) -> torch.Tensor | None:
    """Per-sample residuals (``[2, ...]`` = uncond, cond with CFG) to the batch layout, on ``device``."""
    if any(r is None for r in per_sample):
        return None
    if not use_cfg:
        out = torch.cat(list(per_sample), dim=0)
    else:
        out = torch.cat([r[0:1] for r in per_sample] + [r[1:2] for r in per_sample], dim=0)
    return out if device is None else out.to(device)


@torch.no_grad()
def reuse_costs(run: Any, batch: CalibrationBatch, full_traj: Sequence[Sequence[torch.Tensor]],
                residuals: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor | None]]], num_steps: int,
                candidates: Sequence[int], bar: Any = None) -> list[float | None]:
    """Final-latent MSE vs the full model when only step ``c`` reuses step ``c - 1``'s residual.

    ``full_traj[j][i]``: sample ``j``'s full-model latent before step ``i`` (``i = num_steps``: final);
    ``residuals[j][i]``: its (hidden, encoder) residual at step ``i``. Entries for steps that are not
    candidates are ``None``.
    """
    n_s = len(full_traj)
    final = _stack_states([full_traj[j][num_steps] for j in range(n_s)]).double()
    costs: list[float | None] = [None] * num_steps
    task = bar.add_task("ranking steps by reuse cost", total=len(candidates)) if bar else None
    for c in candidates:
        if c < 1 or c >= num_steps:
            raise DiffspeedError(f"step {c} cannot be reused (valid: 1..{num_steps - 1})")
        x = _stack_states([full_traj[j][c] for j in range(n_s)])
        r_h = _stack_residuals([residuals[j][c - 1][0] for j in range(n_s)], run.use_cfg, run.device)
        r_e = _stack_residuals([residuals[j][c - 1][1] for j in range(n_s)], run.use_cfg, run.device)
        run.ctx.begin(num_steps, explicit=True)
        v, _ = run.velocity(batch, x, c, inject=(r_h, r_e))
        x = x + run.dt(c) * v
        for i in range(c + 1, num_steps):
            v, _ = run.velocity(batch, x, i)
            x = x + run.dt(i) * v
        err = float(((x.double() - final) ** 2).mean())
        costs[c] = err if math.isfinite(err) else math.inf
        if bar:
            bar.advance(task)
    return costs


def _run_allowed(schedule: Sequence[bool], c: int, max_consecutive: int) -> bool:
    """Whether reusing step ``c`` keeps every run of reused steps at most ``max_consecutive`` long."""
    n, run_len = len(schedule), 1
    k = c - 1
    while k >= 0 and schedule[k]:
        run_len, k = run_len + 1, k - 1
    k = c + 1
    while k < n and schedule[k]:
        run_len, k = run_len + 1, k + 1
    return run_len <= max_consecutive


def pick_schedule(costs: Sequence[float | None], reuse_steps: int, max_consecutive: int) -> list[bool]:
    """Reuse the ``reuse_steps`` cheapest candidate steps (``costs[c]`` not None), never more than
    ``max_consecutive`` in a row. Raises naming the limit if the cap leaves too few steps."""
    schedule = [False] * len(costs)
    for c in sorted((c for c in range(len(costs)) if costs[c] is not None), key=lambda c: (costs[c], c)):
        if sum(schedule) == reuse_steps:
            break
        if _run_allowed(schedule, c, max_consecutive):
            schedule[c] = True
    if sum(schedule) < reuse_steps:
        n_cand = sum(c is not None for c in costs)
        raise DiffspeedError(
            f"reuse_steps={reuse_steps} cannot be met: {n_cand} steps may be reused (outside warm-up and final "
            f"steps) and at most {max_consecutive} in a row fit {sum(schedule)} of them in cost order; lower "
            "reuse_steps or raise max_consecutive")
    return schedule


__all__ = ["CalibrationBatch", "offload", "pick_schedule", "reuse_costs"]
