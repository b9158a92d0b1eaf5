"""Offline calibration for ``erta_cache`` (ERTACache): ``diffspeed calibrate erta ...``.

:func:`calibrate_erta` runs the full model on a few calibration samples (seed, label) and writes
what :class:`~diffspeed.methods.erta_cache.ErtaCacheConfig` needs into a small JSON-able dict:

1. **Residual profiling** (one full trajectory per sample, flow-matching Euler exactly as
   :func:`diffspeed.sampler.sample` with batched CFG). Forward hooks on the adapter's first and
   last block record the transformer residual ``r_k`` (last block's output hidden states minus
   the first block's input hidden states). ``rel_l1_change[k]`` is the relative L1 change
   ``|r_k - r_{k-1}|_1 / |r_{k-1}|_1``, computed per CFG branch and per sample, then averaged.
2. **Static schedule** (:func:`build_schedule`): steps ``< warmup_steps`` and the last
   ``final_steps`` are computed; otherwise step ``k`` is reused while the accumulated change since
   the last computed step (``acc + rel_l1_change[k]``) stays below ``threshold`` and fewer than
   ``max_consecutive`` steps in a row were reused; a computed step resets the accumulator.
   Or, with ``reuse_steps=K`` (``--reuse-steps K``), by **measured reuse cost**
   (:mod:`diffspeed.erta_schedule`): for each allowed step, the final-latent error of the full
   trajectory with only that step reused; the ``K`` cheapest steps under the consecutive cap.
3. **Sequential fit on the cached trajectory** (trajectory-aware: the states the cached sampler
   really visits, not the full trajectory's). Walking the schedule with every sample in lockstep:

   * computed step: one full forward, Euler update; its residual becomes ``r_m`` (the previous one ``r_m'``);
   * reused step ``k``: a full forward *at the cached state* gives the true residual ``r_k``;
     **(b) residual linearization**: ``(a_k, b_k) = argmin sum |a r_m + b (r_m - r_m') - r_k|^2
     + ridge * (G_aa (a-1)^2 + G_bb b^2)``, the 2x2 normal equations solved in closed form (the
     small ridge pulls toward plain reuse ``(1, 0)`` when ``r_m - r_m'`` is tiny); then the reused
     step is evaluated exactly as the method will (blocks skipped, corrected residual injected at
     block 0) giving ``v_hat``; **(a) timestep adjustment**: ``dt_scale[k] = <dt v_hat, x*_{k+1} - x_k> /
     |dt v_hat|^2`` (least squares over all samples): the scale of the Euler interval that brings the
     cached state ``x_k`` closest to the *full* trajectory's next state ``x*_{k+1}``, clamped to
     ``dt_scale_bounds``; the cached state then advances with it.
   With ``guidance_threshold`` set, computed steps marked by :func:`build_guidance_schedule` are
   simulated exactly as ``erta_cache`` runs them (uncond half rebuilt from the stored branch
   difference), so the corrections are fitted on the trajectory the method really follows.
4. **Validation** (``validate=True``): the method is run on the calibration samples with the fitted
   corrections, with plain reuse, and (only if needed) with each correction alone; a correction
   is kept only if it lowers the final-latent MSE against the full model on those samples (otherwise
   it is reset to identity: ``dt_scale`` 1, coefficients ``(1, 0)``). ``stats["validation"]`` records
   the errors and what was kept.

How this differs from the paper: ERTACache profiles the reuse error of candidate cache policies and
adjusts timesteps with a per-step coefficient and models the cache error with a closed-form linear
model; here the schedule comes from the full trajectory's step-to-step residual change (TeaCache-like
accumulation on *measured* values), the linearization is two scalars per reused step shared by all
channels / tokens / CFG branches, ``m'`` is the previous *computed* step, encoder-state residuals are
reused plainly, and the validation / fallback step is ours. The calibration is for one model (class +
config hash), one step count, one guidance scale and sigma shift (recorded; only model and step count
are enforced at apply time); ``dt_scale`` assumes an Euler-type update ``x += dt * v``.

File format (JSON, never pickle; written atomically)::

    {"format": "diffspeed-erta/1",
     "model": {"class": ..., "config_hash": ..., "name": ...},
     "num_steps": N, "guidance_scale": g, "shift": s, "timesteps": [...],
     "schedule": [bool] * N, "dt_scale": [float] * N, "residual_coeffs": [[a, b] | null] * N,
     "guidance_reuse": [bool] * N, "guidance_order": 0 | 1,   (optional: absent = no guidance reuse)
     "calibration": {"seeds": [...], "labels": [...], "threshold": ..., ...},
     "stats": {"rel_l1_change": [...], "reused_steps": ..., "validation": {...}, ...}}
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import typer
from torch import nn

from .errors import DiffspeedError

FORMAT = "diffspeed-erta/1"
_IN_MEMORY = "<in-memory calibration>"


# ---- model identity ---------------------------------------------------------------------------------
def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def model_config_hash(model: nn.Module) -> str:
    """sha256 (16 hex digits) of the model's diffusers config as sorted JSON, without ``_``-prefixed keys
    (``_diffusers_version``, ``_name_or_path``, ...: they do not change the network)."""
    config = getattr(_base(model), "config", None)
    items = {str(k): v for k, v in dict(config or {}).items() if not str(k).startswith("_")}
    text = json.dumps(items, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_identity(model: nn.Module, name: str | None = None) -> dict[str, Any]:
    return {"class": type(_base(model)).__name__, "config_hash": model_config_hash(model), "name": name}


def _recalibrate_hint(data: dict[str, Any] | None, out: str) -> str:
    model = "<model>"
    steps = "<N>"
    if isinstance(data, dict):
        name = (data.get("model") or {}).get("name") if isinstance(data.get("model"), dict) else None
        model = name or model
        steps = data.get("num_steps", steps)
    return f"`diffspeed calibrate erta --model {model} --steps {steps} --out {out}`"


def check_model_identity(data: dict[str, Any], model: nn.Module, source: str) -> None:
    """Refuse a calibration made for another model class or config."""
    want = data["model"]
    have = model_identity(model)
    if want.get("class") != have["class"] or want.get("config_hash") != have["config_hash"]:
        made = f"{want.get('class')}/{want.get('config_hash')}"
        if want.get("name"):
            made += f" ({want['name']})"
        raise DiffspeedError(
            f"calibration file {source} was made for {made}, this model is {have['class']}/{have['config_hash']}; "
            f"run `diffspeed calibrate erta --model <this model's name or path> --steps {data.get('num_steps')} "
            f"--out <new.json>` and use that file"
        )


# ---- schedule ---------------------------------------------------------------------------------------
def build_schedule(
    changes: Sequence[float | None],
    *,
    threshold: float,
    max_consecutive: int = 3,
    warmup_steps: int = 2,
    final_steps: int = 1,
) -> list[bool]:
    """Static reuse schedule from per-step residual changes (``changes[0]`` is unused: step 0 is computed)."""
    return _mark_runs(changes, threshold=threshold, max_consecutive=max_consecutive, warmup_steps=warmup_steps,
                      final_steps=final_steps)


def build_guidance_schedule(
    changes: Sequence[float | None],
    schedule: Sequence[bool],
    *,
    threshold: float,
    max_consecutive: int = 2,
    warmup_steps: int = 2,
    final_steps: int = 1,
) -> list[bool]:
    """Computed steps that reuse the CFG branch difference (only the cond half runs the blocks).

    ``changes[k]`` is the guided-velocity error that a stale branch difference adds at step ``k``
    (see :func:`calibrate_erta`). Every step since the last step that computed both halves (reused
    steps included: they keep the old difference too) adds to the accumulator; a computed step in the
    window reuses the difference while the accumulated error stays below ``threshold`` and fewer than
    ``max_consecutive`` computed steps in a row did so. Steps already reused by ``schedule`` are never
    marked (they run no block at all).
    """
    return _mark_runs(changes, threshold=threshold, max_consecutive=max_consecutive, warmup_steps=warmup_steps,
                      final_steps=final_steps, carried=schedule)


def _mark_runs(changes: Sequence[float | None], *, threshold: float, max_consecutive: int, warmup_steps: int,
               final_steps: int, carried: Sequence[bool] | None = None) -> list[bool]:
    """Mark steps while the accumulated change stays below ``threshold`` (at most ``max_consecutive`` in a row,
    none in the warm-up / final steps); an unmarked step resets the run. ``carried`` steps add their change
    to the accumulator without being marked or breaking the run."""
    n = len(changes)
    marks = [False] * n
    acc, consecutive = 0.0, 0
    for k in range(n):
        delta = changes[k]
        if carried is not None and carried[k] and delta is not None:
            acc += delta
            continue
        in_window = k >= max(1, warmup_steps) and k < n - final_steps
        if in_window and delta is not None and consecutive < max_consecutive and acc + delta < threshold:
            marks[k] = True
            acc += delta
            consecutive += 1
        else:
            acc, consecutive = 0.0, 0
    return marks


# ---- file I/O ---------------------------------------------------------------------------------------
def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_calibration(data: Any, source: str = _IN_MEMORY) -> dict[str, Any]:
    """Check the structure of a calibration dict; raises :class:`DiffspeedError` naming the fix."""

    def bad(problem: str) -> DiffspeedError:
        return DiffspeedError(
            f"calibration file {source} is invalid ({problem}); recreate it with "
            f"{_recalibrate_hint(data if isinstance(data, dict) else None, source)}"
        )

    if not isinstance(data, dict):
        raise bad(f"expected a JSON object, got {type(data).__name__}")
    fmt = data.get("format")
    if fmt != FORMAT:
        raise DiffspeedError(
            f"calibration file {source} has format {fmt!r}, this diffspeed reads {FORMAT!r}; recreate it with "
            f"{_recalibrate_hint(data, source)}"
        )
    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("class"), str) or not isinstance(model.get("config_hash"), str):
        raise bad("'model' must hold 'class' and 'config_hash' strings")
    n = data.get("num_steps")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise bad(f"'num_steps' must be a positive integer, got {n!r}")
    schedule = data.get("schedule")
    if not isinstance(schedule, list) or len(schedule) != n or not all(isinstance(s, bool) for s in schedule):
        raise bad(f"'schedule' must be a list of {n} booleans")
    if schedule[0]:
        raise bad("step 0 cannot be reused: there is nothing cached yet")
    dt_scale = data.get("dt_scale")
    if not isinstance(dt_scale, list) or len(dt_scale) != n or not all(_finite(s) and s > 0 for s in dt_scale):
        raise bad(f"'dt_scale' must be a list of {n} finite positive numbers")
    coeffs = data.get("residual_coeffs")
    if not isinstance(coeffs, list) or len(coeffs) != n:
        raise bad(f"'residual_coeffs' must be a list of {n} entries")
    for k, c in enumerate(coeffs):
        if c is None:
            continue
        if not isinstance(c, list) or len(c) != 2 or not all(_finite(v) for v in c):
            raise bad(f"residual_coeffs[{k}] must be null or [a, b] with finite numbers, got {c!r}")
    channel = data.get("channel_coeffs")  # optional: files without it use the scalar pair
    if channel is not None:
        if not isinstance(channel, list) or len(channel) != n:
            raise bad(f"'channel_coeffs' must be null or a list of {n} entries")
        for k, w in enumerate(channel):
            if w is None:
                continue
            ok = (isinstance(w, list) and 1 <= len(w) <= 3 and all(isinstance(row, list) and row for row in w)
                  and len({len(row) for row in w}) == 1 and all(_finite(v) for row in w for v in row))
            if not ok:
                raise bad(f"channel_coeffs[{k}] must be null or 1-3 equally long lists of finite numbers "
                          "(one weight per hidden channel for each feature)")
    if not _finite(data.get("guidance_scale", 0.0)):
        raise bad("'guidance_scale' must be a number")
    if data.get("guidance_order", 0) not in (0, 1) or isinstance(data.get("guidance_order"), bool):
        raise bad(f"'guidance_order' must be 0 or 1, got {data.get('guidance_order')!r}")
    guidance = data.get("guidance_reuse")  # optional: files without it reuse no branch difference
    if guidance is not None:
        if not isinstance(guidance, list) or len(guidance) != n or not all(isinstance(g, bool) for g in guidance):
            raise bad(f"'guidance_reuse' must be a list of {n} booleans")
        if guidance[0]:
            raise bad("step 0 cannot reuse the CFG branch difference: none is stored yet")
    return data


def save_calibration(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``data`` as JSON atomically (temp file in the same directory, fsync, rename)."""
    validate_calibration(data, str(path))
    return write_text_atomic(Path(path), json.dumps(data, indent=2, allow_nan=False) + "\n", "calibration file")


def write_text_atomic(path: Path, text: str, what: str) -> Path:
    """Write ``text`` to ``path`` atomically (temp file in the same directory, fsync, rename: a crash never
    leaves half a file); ``what`` names the file in the error raised when it cannot be created."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise DiffspeedError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def load_calibration(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a calibration JSON; every problem raises :class:`DiffspeedError` naming the fix."""
    source = os.fspath(path)
    p = Path(source).expanduser()
    hint = f"`diffspeed calibrate erta --model <model> --steps <N> --out {source}`"
    if not p.exists():
        raise DiffspeedError(f"calibration file {source} does not exist; create it with {hint}")
    if p.is_dir():
        raise DiffspeedError(f"calibration path {source} is a directory; give the JSON file written by {hint}")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DiffspeedError(f"cannot read calibration file {source} ({exc}); recreate it with {hint}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DiffspeedError(
            f"calibration file {source} is not valid JSON ({exc.msg} at line {exc.lineno}; corrupted?); "
            f"recreate it with {hint}"
        ) from None
    return validate_calibration(data, source)


# ---- calibration ------------------------------------------------------------------------------------
class _Sample:
    """One calibration sample: its condition, initial noise and a forward that records the residual."""

    def __init__(self, run: "_Runner", seed: int, label: int) -> None:
        from .sampler import _cat_kwargs, initial_noise

        self.seed, self.label = seed, label
        loaded = run.loaded
        cond = loaded.make_condition([label], run.device)
        self.condition = cond
        if run.use_cfg:
            if cond.uncond is None:
                raise DiffspeedError("guidance scale > 1 needs an unconditional condition; use --guidance 1")
            self.kwargs = _cat_kwargs(cond.uncond, cond.cond)
        else:
            self.kwargs = cond.cond
        self.x0 = initial_noise([seed], loaded.latent_shape, run.device, torch.float32)


class _Runner:
    def __init__(self, loaded: Any, guidance_scale: float, num_steps: int, shift: float) -> None:
        from .context import get_context
        from .sampler import _device_and_dtype, flow_sigmas

        self.loaded = loaded
        self.model = loaded.transformer
        self.adapter = loaded.adapter
        self.g = float(guidance_scale)
        self.use_cfg = self.g > 1.0
        self.device, self.dtype = _device_and_dtype(self.model)
        self.sigmas = flow_sigmas(num_steps, shift)
        self.timesteps = [float(s) * 1000.0 for s in self.sigmas[:-1]]
        self.ctx = get_context(self.model)
        self.blocks = self.adapter.blocks(self.model)
        self.cap: dict[str, Any] = {"on": False}
        first_io, last_io = self.blocks[0][2], self.blocks[-1][2]

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.cap["on"]:
                self.cap["in"] = first_io.get_states(args, kwargs)

        def post(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            if self.cap["on"]:
                self.cap["out"] = last_io.split_output(out)

        self.hooks = [
            self.blocks[0][1].register_forward_pre_hook(pre, with_kwargs=True),
            self.blocks[-1][1].register_forward_hook(post, with_kwargs=True),
        ]

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.ctx.explicit = False

    def dt(self, i: int) -> float:
        return float(self.sigmas[i + 1]) - float(self.sigmas[i])

    def velocity(
        self, s: _Sample, x: torch.Tensor, i: int, inject: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        cfg: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None] | None]:
        """The guided velocity at ``x``, step ``i`` (as the sampler computes it), and the residual (h, e).

        ``cfg`` (batched CFG only) is one sample's guidance-reuse state: the true output branch
        difference goes to ``cfg["d_true"]`` (profiling). With ``cfg["order"]`` set the method is
        simulated: with ``cfg["reuse"]`` the uncond half of the output and of the residual is rebuilt
        from the stored ``cfg["d_out"]`` / ``cfg["d_res"]`` exactly as ``erta_cache`` does at run
        time, else a computed step stores them.
        """
        from .methods.erta_cache import half_difference, injected_residual, rebuild_first_half, remember, stale_difference

        t = self.timesteps[i]
        batch = x.shape[0]
        t_vec = torch.full((batch,), t, device=self.device, dtype=torch.float32)
        self.cap.update(on=inject is None, **{"in": None, "out": None})
        with injected_residual(self.model, self.adapter, *inject) if inject is not None else contextlib.nullcontext():
            if self.use_cfg:
                self.ctx.set_step(i, t, "batched")
                both = self.adapter.predict(self.model, torch.cat([x, x]).to(self.dtype), torch.cat([t_vec, t_vec]),
                                            s.kwargs).float()
                out_u, out_c = both.chunk(2)
                if cfg is not None:
                    cfg["d_true"] = out_c - out_u
                    simulate = "order" in cfg  # else profiling: the true difference is all that is wanted
                    if simulate and cfg.get("reuse"):
                        out_u = out_c - stale_difference(cfg["d_out"], i, cfg["order"])
                    elif simulate and inject is None:
                        remember(cfg.setdefault("d_out", []), i, cfg["d_true"])
                v = out_u + self.g * (out_c - out_u)
            else:
                self.ctx.set_step(i, t, "cond")
                v = self.adapter.predict(self.model, x.to(self.dtype), t_vec, s.kwargs).float()
        self.cap["on"] = False
        residual = None
        if inject is None:
            if self.cap.get("in") is None or self.cap.get("out") is None:
                raise DiffspeedError("calibration could not observe the first/last transformer block of this model")
            (h_in, e_in), (h_out, e_out) = self.cap["in"], self.cap["out"]
            res_e = e_out - e_in if (e_in is not None and e_out is not None and e_out.shape == e_in.shape) else None
            res_h = h_out - h_in
            if cfg is not None and self.use_cfg and "order" in cfg:
                if cfg.get("reuse"):
                    d_h, d_e = stale_difference(cfg["d_res"], i, cfg["order"])
                    res_h = rebuild_first_half(res_h.chunk(2)[1], d_h)
                    res_e = rebuild_first_half(res_e.chunk(2)[1], d_e) if (res_e is not None and d_e is not None) else None
                else:
                    remember(cfg.setdefault("d_res", []), i,
                             (half_difference(res_h), half_difference(res_e) if res_e is not None else None))
            residual = (res_h, res_e)
        return v, residual


def _row_rel_l1(new: torch.Tensor, old: torch.Tensor) -> list[float]:
    """Relative L1 change per batch row (one row per CFG branch of one sample)."""
    a = new.detach().double().flatten(1)
    b = old.detach().double().flatten(1)
    num = (a - b).abs().mean(dim=1)
    den = b.abs().mean(dim=1).clamp_min(1e-12)
    return [float(v) for v in (num / den)]


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() * b.detach().double()).sum())


def _progress(enabled: bool):  # noqa: ANN202
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True))


def _check_args(num_steps: int, seeds: Sequence[int], labels: Sequence[int], guidance_scale: float, threshold: float,
                max_consecutive: int, warmup_steps: int, final_steps: int, shift: float,
                dt_scale_bounds: tuple[float, float], ridge: float) -> None:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(num_steps) or num_steps <= 0:
        raise DiffspeedError(f"--steps must be a positive integer, got {num_steps!r}")
    if not seeds:
        raise DiffspeedError("calibration needs at least one seed (--seeds N with N >= 1)")
    if len(labels) != len(seeds):
        raise DiffspeedError(f"got {len(labels)} labels for {len(seeds)} seeds; give one label per seed")
    if not _finite(guidance_scale) or guidance_scale < 0:
        raise DiffspeedError(f"--guidance must be >= 0, got {guidance_scale!r}")
    if not _finite(threshold) or threshold <= 0:
        raise DiffspeedError(f"--threshold must be > 0 (e.g. 0.15; higher = more reuse), got {threshold!r}")
    if not is_int(max_consecutive) or max_consecutive < 1:
        raise DiffspeedError(f"max_consecutive must be an integer >= 1, got {max_consecutive!r}")
    if not is_int(warmup_steps) or warmup_steps < 1:
        raise DiffspeedError(f"warmup_steps must be an integer >= 1 (step 0 has nothing to reuse), got {warmup_steps!r}")
    if not is_int(final_steps) or final_steps < 0:
        raise DiffspeedError(f"final_steps must be an integer >= 0, got {final_steps!r}")
    if not _finite(shift) or shift <= 0:
        raise DiffspeedError(f"shift must be > 0, got {shift!r}")
    lo, hi = dt_scale_bounds
    if not (_finite(lo) and _finite(hi) and 0 < lo <= 1.0 <= hi):
        raise DiffspeedError(f"dt_scale_bounds must satisfy 0 < low <= 1 <= high, got {dt_scale_bounds!r}")
    if not _finite(ridge) or ridge < 0:
        raise DiffspeedError(f"ridge must be >= 0, got {ridge!r}")


@torch.no_grad()
def calibrate_erta(
    loaded: Any,
    *,
    num_steps: int,
    seeds: Sequence[int],
    labels: Sequence[int] | None = None,
    guidance_scale: float = 4.0,
    threshold: float = 0.15,
    max_consecutive: int = 3,
    warmup_steps: int = 2,
    final_steps: int = 1,
    shift: float = 1.0,
    dt_scale_bounds: tuple[float, float] = (0.5, 1.5),
    ridge: float = 1e-3,
    validate: bool = True,
    progress: bool = False,
    reuse_steps: int | None = None,
    guidance_threshold: float | None = None,
    guidance_max_consecutive: int = 2,
    guidance_order: int = 0,
    correction: str = "channel",
    correction_order: int = 1,
) -> dict[str, Any]:
    """Calibrate ERTACache for ``loaded`` (a :class:`~diffspeed.models.bundle.LoadedModel`); see the module doc.

    ``reuse_steps=K`` picks the schedule by measured reuse cost instead of ``threshold``: the ``K``
    steps whose reuse alone costs the least final-output error (:mod:`diffspeed.erta_schedule`).

    ``guidance_threshold`` (batched CFG only; None = off) also marks *computed* steps on which only
    the cond half of the batch runs the blocks and the uncond half is rebuilt from the last fully
    computed step's branch difference (:func:`build_guidance_schedule`; at most
    ``guidance_max_consecutive`` such steps in a row). The per-step cost it thresholds is the
    guided-velocity error of a stale difference, ``(g - 1) |d_k - d_{k-1}|_1 / |v_k|_1``, measured on
    the full trajectories. ``guidance_order`` 0 reuses the last fully computed step's difference as it
    is; 1 extrapolates it linearly from the last two (measured less faithful on the reference image
    model: ``benchmarks/results/erta_guidance_cpu.json``).

    ``correction`` picks the residual linearization fitted for reused steps: ``"scalar"`` is two
    numbers per step, ``a r_m + b (r_m - r_m')``; ``"channel"`` (default) fits one weight per hidden
    channel (last dim of the residual) for each of ``correction_order + 1`` finite-difference
    features of the computed residuals (value, slope, curvature), by per-channel least squares with a
    ridge toward plain reuse; validation falls back to the scalar pair when that is what lowers the
    calibration samples' final error. Measured at equal reuse on held-out seeds
    (``benchmarks/results/erta_correction_cpu.json``): per-channel order 1 beats the scalar pair by
    0.8-1.6 dB in 5 of 6 schedules (the sixth kept the scalar pair: -0.2 dB); curvature (order 2) adds
    0.5-2.0 dB more on the reference image model but costs 0.2-0.6 dB on the video model and keeps one
    more residual per CFG branch in memory, so order 1 is the default.

    ``labels`` default to ``i % num_classes`` (class-conditional models) or ``i``. Returns the JSON-able
    dict that :func:`save_calibration` writes and ``ErtaCacheConfig(calibration=path)`` reads.
    """
    from .methods.base import Stage, applied_methods
    from .methods.erta_cache import channel_residual, corrected_residual, history_weights, residual_history

    t_start = time.perf_counter()
    seeds = [int(s) for s in seeds]
    if labels is None:
        k = loaded.num_classes
        labels = [i % k if k else i for i in range(len(seeds))]
    labels = [int(x) for x in labels]
    dt_scale_bounds = (float(dt_scale_bounds[0]), float(dt_scale_bounds[1]))
    _check_args(num_steps, seeds, labels, guidance_scale, threshold, max_consecutive, warmup_steps, final_steps,
                shift, dt_scale_bounds, ridge)
    if reuse_steps is not None:
        # checked before any model call: at most max_consecutive reused in a row within the window
        window = max(num_steps - final_steps - max(1, warmup_steps), 0)
        most = window - window // (max_consecutive + 1)
        if isinstance(reuse_steps, bool) or not isinstance(reuse_steps, int) or not 1 <= reuse_steps <= most:
            raise DiffspeedError(f"reuse_steps must be an integer in 1..{most} ({window} steps outside the "
                                 f"{warmup_steps} warm-up and {final_steps} final steps, at most {max_consecutive} "
                                 f"reused in a row), got {reuse_steps!r}")
    if guidance_threshold is not None:
        if not _finite(guidance_threshold) or guidance_threshold <= 0:
            raise DiffspeedError(f"--guidance-threshold must be > 0 (e.g. 0.05; higher = more guidance reuse), "
                                 f"got {guidance_threshold!r}")
        if not guidance_scale > 1.0:
            raise DiffspeedError(f"--guidance-threshold reuses the CFG branch difference, which needs guidance > 1 "
                                 f"(got --guidance {guidance_scale}); drop --guidance-threshold")
        if isinstance(guidance_max_consecutive, bool) or not isinstance(guidance_max_consecutive, int) \
                or guidance_max_consecutive < 1:
            raise DiffspeedError(f"guidance_max_consecutive must be an integer >= 1, got {guidance_max_consecutive!r}")
        if guidance_order not in (0, 1) or isinstance(guidance_order, bool):
            raise DiffspeedError(f"guidance_order must be 0 (reuse the last difference) or 1 (extrapolate), "
                                 f"got {guidance_order!r}")
    if correction not in ("channel", "scalar"):
        raise DiffspeedError(f"correction must be 'channel' (one weight per hidden channel) or 'scalar' (two numbers "
                             f"per step), got {correction!r}")
    if correction_order not in (1, 2) or isinstance(correction_order, bool):
        raise DiffspeedError(f"correction_order must be 1 (value + slope) or 2 (+ curvature), got {correction_order!r}")
    model = loaded.transformer
    caches = [name for name, h in applied_methods(model).items() if h.config.stage in (Stage.BLOCK, Stage.STEP)]
    if caches:
        raise DiffspeedError(
            f"calibration needs the model without caches, but {', '.join(caches)} is applied; remove() it first"
        )

    run = _Runner(loaded, guidance_scale, num_steps, shift)
    samples = [_Sample(run, s, lab) for s, lab in zip(seeds, labels)]
    n, n_s = num_steps, len(samples)
    bar = _progress(progress)
    if bar is not None:
        bar.start()
    try:
        # 1. residual profiling on the full trajectories ----------------------------------------------
        task = bar.add_task("profiling (full model)", total=n_s) if bar else None
        change_rows: list[list[float]] = [[] for _ in range(n)]
        guidance_rows: list[list[float]] = [[] for _ in range(n)]
        profile_guidance = guidance_threshold is not None
        full_traj: list[list[torch.Tensor]] = []
        full_res: list[list[Any]] = []  # per-sample residuals, kept only for the reuse-cost ranking
        for s in samples:
            run.ctx.begin(n, explicit=True)
            x, prev, traj, res = s.x0, None, [s.x0], []
            cfg: dict[str, Any] | None = {} if profile_guidance else None
            prev_d = None
            for i in range(n):
                v, (r_h, r_e) = run.velocity(s, x, i, cfg=cfg)
                if cfg is not None:
                    if prev_d is not None:
                        err = (run.g - 1.0) * (cfg["d_true"] - prev_d).abs().mean() / v.abs().mean().clamp_min(1e-12)
                        guidance_rows[i].append(float(err))
                    prev_d = cfg["d_true"]
                if reuse_steps is not None:
                    from .erta_schedule import offload

                    res.append((offload(r_h), offload(r_e)))
                if prev is not None and prev.shape == r_h.shape:
                    change_rows[i].extend(_row_rel_l1(r_h, prev))
                prev = r_h
                x = x + run.dt(i) * v
                traj.append(x)
            full_traj.append(traj)
            full_res.append(res)
            if bar:
                bar.advance(task)
        changes: list[float | None] = [None] + [
            (sum(rows) / len(rows) if rows else None) for rows in change_rows[1:]
        ]
        costs: list[float | None] | None = None
        if reuse_steps is None:
            schedule = build_schedule(changes, threshold=threshold, max_consecutive=max_consecutive,
                                      warmup_steps=warmup_steps, final_steps=final_steps)
        else:
            from .erta_schedule import CalibrationBatch, pick_schedule, reuse_costs

            candidates = list(range(max(1, warmup_steps), n - final_steps))
            costs = reuse_costs(run, CalibrationBatch(run, labels), full_traj, full_res, n, candidates, bar)
            del full_res
            schedule = pick_schedule(costs, reuse_steps, max_consecutive)
        guidance_changes: list[float | None] = [
            (sum(rows) / len(rows) if rows else None) for rows in guidance_rows
        ]
        guidance = (build_guidance_schedule(guidance_changes, schedule, threshold=guidance_threshold,
                                            max_consecutive=guidance_max_consecutive, warmup_steps=warmup_steps,
                                            final_steps=final_steps)
                    if guidance_threshold is not None else [False] * n)

        # 2. sequential fit on the cached trajectory -------------------------------------------------
        dt_scale = [1.0] * n
        coeffs: list[list[float] | None] = [None] * n
        channel_coeffs: list[list[list[float]] | None] = [None] * n
        dt_raw: list[float | None] = [None] * n
        res_err_plain: list[float | None] = [None] * n
        res_err_corr: list[float | None] = [None] * n
        task = bar.add_task("fitting corrections", total=n * n_s) if bar else None
        run.ctx.begin(n, explicit=True)
        xs = [s.x0 for s in samples]
        mem: list[dict[str, Any]] = [{"r_m": None, "r_prev": None, "r_prev2": None} for _ in samples]
        curvature = correction == "channel" and correction_order >= 2
        cfg_states: list[dict[str, Any] | None] = [{"order": guidance_order} if any(guidance) else None
                                                   for _ in samples]
        for i in range(n):
            dt = run.dt(i)
            if not schedule[i]:
                for j, s in enumerate(samples):
                    if cfg_states[j] is not None:
                        cfg_states[j]["reuse"] = guidance[i]
                    v, res = run.velocity(s, xs[j], i, cfg=cfg_states[j])
                    if curvature:  # one more residual per sample kept only when a weight needs it
                        mem[j]["r_prev2"] = mem[j]["r_prev"]
                    mem[j]["r_prev"], mem[j]["r_m"] = mem[j]["r_m"], res
                    xs[j] = xs[j] + dt * v
                    if bar:
                        bar.advance(task)
                continue
            # (b) residual linearization: normal equations over every sample and CFG branch
            g = [[0.0, 0.0], [0.0, 0.0]]
            y = [0.0, 0.0]
            truths: list[torch.Tensor] = []
            have_diff = all(m["r_prev"] is not None and m["r_prev"][0].shape == m["r_m"][0].shape for m in mem)
            plain_num = norm = 0.0
            for j, s in enumerate(samples):
                _, (r_true, _) = run.velocity(s, xs[j], i)
                truths.append(r_true)
                r_m = mem[j]["r_m"][0]
                g[0][0] += _dot(r_m, r_m)
                y[0] += _dot(r_m, r_true)
                if have_diff:
                    d = r_m - mem[j]["r_prev"][0]
                    g[0][1] += _dot(r_m, d)
                    g[1][1] += _dot(d, d)
                    y[1] += _dot(d, r_true)
                plain_num += _dot(r_m - r_true, r_m - r_true)
                norm += _dot(r_true, r_true)
            a, b = _solve_linearization(g, y, ridge, have_diff)
            coeffs[i] = [a, b]
            weights: torch.Tensor | None = None
            if correction == "channel":
                weights = _fit_channel_weights(mem, truths, correction_order, ridge)
                channel_coeffs[i] = [[float(f"{v:.7g}") for v in row] for row in weights.tolist()]
                # what the method will apply: the file's rounded values, in the residual basis
                weights = history_weights(torch.tensor(channel_coeffs[i], dtype=torch.float64))
            # (a) timestep adjustment toward the full trajectory's next state
            num = den = corr_num = 0.0
            vels: list[torch.Tensor] = []
            for j, s in enumerate(samples):
                r_m, e_m = mem[j]["r_m"]
                prev = mem[j]["r_prev"][0] if mem[j]["r_prev"] is not None else None
                if weights is not None:
                    prev2 = mem[j]["r_prev2"][0] if mem[j]["r_prev2"] is not None else None
                    history = residual_history(r_m, prev, prev2, weights.shape[0])
                    r_c = channel_residual(history, weights)  # type: ignore[arg-type]
                else:
                    r_c = corrected_residual(r_m, prev, a, b)
                corr_num += _dot(r_c - truths[j], r_c - truths[j])
                v, _ = run.velocity(s, xs[j], i, inject=(r_c, e_m))
                vels.append(v)
                step = dt * v
                num += _dot(step, full_traj[j][i + 1] - xs[j])
                den += _dot(step, step)
                if bar:
                    bar.advance(task)
            raw = num / den if den > 0 else 1.0
            dt_raw[i] = raw
            scale = min(max(raw, dt_scale_bounds[0]), dt_scale_bounds[1]) if math.isfinite(raw) else 1.0
            dt_scale[i] = scale
            res_err_plain[i] = math.sqrt(plain_num / max(norm, 1e-30))
            res_err_corr[i] = math.sqrt(corr_num / max(norm, 1e-30))
            for j in range(n_s):
                xs[j] = xs[j] + (scale * dt) * vels[j]
        run.close()  # hooks off before validation (idempotent; also in `finally`)

        data: dict[str, Any] = {
            "format": FORMAT,
            "model": model_identity(model, getattr(loaded, "name", None)),
            "num_steps": n,
            "guidance_scale": float(guidance_scale),
            "shift": float(shift),
            "timesteps": list(run.timesteps),
            "schedule": schedule,
            "guidance_reuse": guidance,
            "guidance_order": guidance_order,
            "dt_scale": dt_scale,
            "residual_coeffs": coeffs,
            "residual_correction": correction,
            "channel_coeffs": channel_coeffs if correction == "channel" else None,
            "calibration": {
                "seeds": seeds,
                "labels": labels,
                "threshold": float(threshold) if reuse_steps is None else None,
                "schedule_rule": "threshold" if reuse_steps is None else "reuse_cost",
                "reuse_steps": reuse_steps,
                "guidance_threshold": None if guidance_threshold is None else float(guidance_threshold),
                "guidance_max_consecutive": guidance_max_consecutive,
                "max_consecutive": max_consecutive,
                "warmup_steps": warmup_steps,
                "final_steps": final_steps,
                "cfg_mode": "batched",
                "dt_scale_bounds": list(dt_scale_bounds),
                "ridge": float(ridge),
                "correction_order": correction_order if correction == "channel" else 1,
                "device": str(run.device),
                "dtype": str(run.dtype).replace("torch.", ""),
            },
            "stats": {
                "rel_l1_change": changes,
                "reuse_cost_mse": costs,
                "reused_steps": sum(schedule),
                "computed_steps": n - sum(schedule),
                "guidance_change": guidance_changes if guidance_threshold is not None else None,
                "guidance_reused_steps": sum(guidance),
                "residual_rel_error_plain": res_err_plain,
                "residual_rel_error_corrected": res_err_corr,
                "dt_scale_unclamped": dt_raw,
            },
        }
        # 4. validation: keep a correction only if it lowers the final error on these samples (and the
        #    scalar pair instead of the per-channel weights where that is what lowers it) ----------
        if validate and (any(schedule) or any(guidance)):
            data["stats"]["validation"] = _validate(loaded, data, samples, guidance_scale, shift, bar)
        try:
            from . import __version__ as version
        except ImportError:  # pragma: no cover
            version = "unknown"
        data["calibration"]["diffspeed_version"] = version
        data["stats"]["seconds"] = round(time.perf_counter() - t_start, 3)
    finally:
        run.close()
        if bar is not None:
            bar.stop()
    return validate_calibration(data)


def _solve_linearization(g: list[list[float]], y: list[float], ridge: float, have_diff: bool) -> tuple[float, float]:
    """argmin |a r_m + b d - r|^2 + ridge (G_aa (a-1)^2 + G_bb b^2) in closed form (2x2 normal equations)."""
    gaa, gab, gbb = g[0][0], g[0][1], g[1][1]
    if gaa <= 0:
        return 1.0, 0.0
    la = ridge * gaa
    if not have_diff or gbb <= 1e-12 * gaa:
        return (y[0] + la) / (gaa + la), 0.0
    lb = ridge * gbb
    m00, m01, m11 = gaa + la, gab, gbb + lb
    r0, r1 = y[0] + la, y[1]
    det = m00 * m11 - m01 * m01
    if not det > 1e-12 * m00 * m11:
        return (y[0] + la) / (gaa + la), 0.0
    a = (r0 * m11 - m01 * r1) / det
    b = (m00 * r1 - m01 * r0) / det
    if not (math.isfinite(a) and math.isfinite(b)):
        return 1.0, 0.0
    return a, b


def _fit_channel_weights(mem: list[dict[str, Any]], truths: list[torch.Tensor], order: int,
                         ridge: float) -> torch.Tensor:
    """Per-channel least squares ``truth ~= sum_i w_i f_i`` over every sample, CFG branch and token, with a
    ridge ``ridge * G_ii`` pulling each channel's weights toward plain reuse ``(1, 0, ...)``.

    The features are :func:`~diffspeed.methods.erta_cache.residual_features` of each sample's computed
    residuals: ``order + 1`` of them, fewer while fewer computed steps exist (all samples share the
    schedule, so the count is the same for all). Returns ``[count, C]`` (float64, CPU); a channel whose
    system is singular or not finite keeps plain reuse.
    """
    from .methods.erta_cache import residual_features

    def features(m: dict[str, Any], want: int) -> list[torch.Tensor] | None:
        return residual_features(m["r_m"][0], m["r_prev"][0] if m["r_prev"] is not None else None,
                                 m["r_prev2"][0] if m["r_prev2"] is not None else None, want)

    count = next(want for want in range(order + 1, 0, -1) if all(features(m, want) is not None for m in mem))
    gram = rhs = None
    for m, truth in zip(mem, truths):
        c = truth.shape[-1]
        f = torch.stack([x.detach().double().reshape(-1, c) for x in features(m, count)])  # type: ignore[union-attr]
        t = truth.detach().double().reshape(-1, c)
        g, y = torch.einsum("irc,jrc->cij", f, f), torch.einsum("irc,rc->ci", f, t)
        gram, rhs = (g, y) if gram is None else (gram + g, rhs + y)
    assert gram is not None and rhs is not None
    w0 = torch.zeros(gram.shape[0], count, dtype=torch.float64, device=gram.device)
    w0[:, 0] = 1.0
    diag = torch.diagonal(gram, dim1=1, dim2=2)
    lam = ridge * diag + 1e-30
    w = torch.linalg.solve(gram + torch.diag_embed(lam), (rhs + lam * w0).unsqueeze(-1)).squeeze(-1)
    bad = ~torch.isfinite(w).all(dim=1) | (diag[:, 0] <= 0)
    w[bad] = w0[bad]
    return w.T.contiguous().cpu()


def _validate(loaded: Any, data: dict[str, Any], samples: list[_Sample], guidance_scale: float, shift: float,
              bar: Any) -> dict[str, Any]:
    from .methods.erta_cache import ErtaCacheConfig, apply_with_data
    from .sampler import sample

    model, adapter = loaded.transformer, loaded.adapter
    n = int(data["num_steps"])
    task = bar.add_task("validating", total=3 * len(samples)) if bar else None

    guidance = any(data.get("guidance_reuse") or ())

    channel = data.get("channel_coeffs") is not None

    def final(flags: tuple[bool, bool] | None, use_guidance: bool = True, scalar: bool = False) -> list[torch.Tensor]:
        handle = None
        if flags is not None:
            cfg = ErtaCacheConfig(calibration=_IN_MEMORY, use_timestep_adjust=flags[0], use_residual_correction=flags[1],
                                  use_guidance_reuse=use_guidance)
            handle = apply_with_data(model, cfg, adapter, {**data, "channel_coeffs": None} if scalar else data)
        try:
            outs = []
            for s in samples:
                outs.append(sample(model, s.condition, seeds=[s.seed], latent_shape=loaded.latent_shape,
                                   num_steps=n, guidance_scale=guidance_scale, shift=shift, adapter=adapter,
                                   check_finite=False))
                if bar:
                    bar.advance(task)
            return outs
        finally:
            if handle is not None:
                handle.remove()

    def mse(outs: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
        vals = [float(((o.double() - r.double()) ** 2).mean()) for o, r in zip(outs, ref)]
        total = sum(vals) / len(vals)
        return total if math.isfinite(total) else math.inf

    # (timestep adjust, residual correction, scalar pair instead of the per-channel weights)
    variants = {"both": (True, True, False), "both_scalar": (True, True, True), "residual_only": (False, True, False),
                "residual_only_scalar": (False, True, True), "dt_only": (True, False, False),
                "plain": (False, False, False)}
    if not channel:
        variants = {k: v for k, v in variants.items() if not k.endswith("_scalar")}

    def measure(names: Sequence[str]) -> None:
        if bar:
            bar.update(task, total=(len(errors) + len(names) + 1) * len(samples))
        for name in names:
            ts, rc, sc = variants[name]
            errors[name] = mse(final((ts, rc), scalar=sc), full)

    full = final(None)
    errors: dict[str, float] = {}
    measure([k for k in ("plain", "both", "both_scalar") if k in variants])
    if min(errors, key=errors.__getitem__) == "plain":  # neither full correction helps: try each one alone
        measure([k for k in ("dt_only", "residual_only", "residual_only_scalar") if k in variants])
    kept = min(errors, key=lambda k: (errors[k], list(variants).index(k)))
    ts, rc, sc = variants[kept]
    if not ts:
        data["dt_scale"] = [1.0] * n
    if not rc:
        data["residual_coeffs"] = [[1.0, 0.0] if c is not None else None for c in data["residual_coeffs"]]
    if (not rc or sc) and channel:
        data["channel_coeffs"] = None
        data["residual_correction"] = "scalar"
    out = {"metric": "mse of final latents vs the full model, mean over calibration samples",
           "mse": errors, "kept": kept}
    if guidance:  # what the guidance reuse costs, with the kept corrections (recorded, not acted on)
        if bar:
            bar.update(task, total=(len(errors) + 2) * len(samples))
        out["mse_without_guidance_reuse"] = mse(final((ts, rc), use_guidance=False), full)
    return out


# ---- CLI --------------------------------------------------------------------------------------------
app = typer.Typer(name="calibrate", help="Offline calibration for methods that need it (erta_cache).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

DTYPES = ("float32", "bfloat16", "float16")


@app.callback()
def _calibrate() -> None:
    """Offline calibration for methods that need it (erta_cache)."""


def _device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if dtype not in DTYPES:
        raise DiffspeedError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DiffspeedError(f"--device {device} requested but no CUDA GPU is available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda") and device != "mps":
        raise DiffspeedError(f"--device must be cpu, cuda[:N] or mps, got {device!r}")
    return torch.device(device), getattr(torch, dtype)


def _default_out(model: str, steps: int) -> Path:
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(model).name or model).strip("-.") or "model"
    return Path(f"erta-{stem}-{steps}steps.json")


@app.command()
def erta(
    model: str = typer.Option("reference-image", help="model name (see `diffspeed models`), local diffusers dir or hub id"),
    steps: int = typer.Option(25, help="denoising steps of the generations this calibration is for"),
    seeds: int = typer.Option(4, "--seeds", help="number of calibration samples (seeds --seed .. --seed+N-1)"),
    seed: int = typer.Option(0, help="first calibration seed"),
    guidance: float = typer.Option(4.0, help="classifier-free guidance scale of those generations"),
    threshold: float = typer.Option(0.15, help="accumulated residual change below which a step is reused (higher = faster)"),
    max_consecutive: int = typer.Option(3, help="at most this many reused steps in a row"),
    reuse_steps: Optional[int] = typer.Option(None, "--reuse-steps", help="reuse exactly this many steps, the ones whose reuse alone costs the least final error (measured; replaces --threshold)"),
    guidance_threshold: Optional[float] = typer.Option(None, "--guidance-threshold", help="batched CFG: on computed steps whose accumulated guided-velocity error from a stale branch difference stays below this, run only the cond half and rebuild uncond (e.g. 0.05; default off)"),
    guidance_max_consecutive: int = typer.Option(2, help="at most this many computed steps in a row reuse the branch difference"),
    guidance_order: int = typer.Option(0, help="0: reuse the last full step's branch difference; 1: extrapolate it from the last two"),
    correction: str = typer.Option("channel", help="residual linearization of reused steps: 'channel' (one weight per hidden channel and feature) or 'scalar' (two numbers per step)"),
    correction_order: int = typer.Option(1, help="'channel' features: 1 = value + slope of the computed residuals, 2 = + curvature (keeps one more residual in memory)"),
    warmup: int = typer.Option(2, help="first steps always computed"),
    final: int = typer.Option(1, help="last steps always computed"),
    shift: float = typer.Option(1.0, help="sigma shift of the flow-matching schedule"),
    out: Optional[Path] = typer.Option(None, help="output JSON (default: erta-<model>-<steps>steps.json)"),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="keep corrections only if they help on the calibration samples"),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
) -> None:
    """Calibrate erta_cache (ERTACache) for one model and step count; write the JSON its `calibration` option reads."""
    try:
        _erta(model=model, steps=steps, n_seeds=seeds, seed=seed, guidance=guidance, threshold=threshold,
              max_consecutive=max_consecutive, reuse_steps=reuse_steps, warmup=warmup, final=final, shift=shift,
              out=out, validate=validate, guidance_threshold=guidance_threshold,
              guidance_max_consecutive=guidance_max_consecutive, guidance_order=guidance_order,
              correction=correction, correction_order=correction_order, device=device, dtype=dtype)
    except DiffspeedError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _erta(*, model: str, steps: int, n_seeds: int, seed: int, guidance: float, threshold: float, max_consecutive: int,
          reuse_steps: int | None, warmup: int, final: int, shift: float, out: Path | None, validate: bool, device: str,
          dtype: str, guidance_threshold: float | None = None, guidance_max_consecutive: int = 2,
          guidance_order: int = 0, correction: str = "channel", correction_order: int = 1) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if steps <= 0:
        raise DiffspeedError(f"--steps must be a positive integer, got {steps}")
    if n_seeds <= 0:
        raise DiffspeedError(f"--seeds must be a positive integer (number of calibration samples), got {n_seeds}")
    out = out if out is not None else _default_out(model, steps)
    if out.suffix.lower() != ".json":
        raise DiffspeedError(f"--out must end with .json, got {out}")
    if out.exists() and out.is_dir():
        raise DiffspeedError(f"--out {out} is a directory; give a .json file path")
    dev, dt = _device_dtype(device, dtype)
    from .models.loading import load_model

    loaded = load_model(model, device=dev, dtype=dt)
    seed_list = [seed + i for i in range(n_seeds)]
    data = calibrate_erta(loaded, num_steps=steps, seeds=seed_list, guidance_scale=guidance, threshold=threshold,
                          max_consecutive=max_consecutive, warmup_steps=warmup, final_steps=final, shift=shift,
                          validate=validate, progress=True, reuse_steps=reuse_steps,
                          guidance_threshold=guidance_threshold, guidance_max_consecutive=guidance_max_consecutive,
                          guidance_order=guidance_order, correction=correction, correction_order=correction_order)
    save_calibration(data, out)
    reused = [k for k, s in enumerate(data["schedule"]) if s]
    val = data["stats"].get("validation")
    typer.echo(f"wrote {out}: {len(reused)}/{steps} steps reused {reused}, in {data['stats']['seconds']:.1f} s")
    halves = [k for k, g in enumerate(data["guidance_reuse"]) if g]
    if guidance_threshold is not None:
        typer.echo(f"{len(halves)} computed steps run the cond half only (CFG branch difference reused): {halves}")
    if not reused:
        changes = [c for c in data["stats"]["rel_l1_change"] if c is not None]
        if changes:
            typer.echo(f"no step is reused: the per-step residual changes are {min(changes):.3g}..{max(changes):.3g}, "
                       f"so --threshold {threshold} never accumulates; raise --threshold (or lower --warmup/--final)")
    if val:
        typer.echo(f"calibration-sample MSE vs full: plain reuse {val['mse']['plain']:.3g}, "
                   f"kept '{val['kept']}' {val['mse'][val['kept']]:.3g}")
    typer.echo(f"use it with the recipe entry {{\"method\": \"erta_cache\", \"calibration\": \"{out}\"}}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
