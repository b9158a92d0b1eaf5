"""Cumulative quantization-error compensation (after "Error Propagation Mechanisms and Compensation
Strategies for Quantized Diffusion").

A quantized model's velocity error at step ``i`` is not only its own: the state ``x^q_i`` it is
evaluated at already drifted from the full-precision trajectory by the errors of steps ``< i``, and
every later step integrates that drift again. Correcting each step's error in isolation (against the
full model's velocity at the *same* state) therefore leaves the accumulated drift in place. Here the
correction is fitted along the quantized trajectory itself, so it also pulls the drift back:

1. run the full-precision trajectory ``x^fp_0 .. x^fp_N`` once (flow-matching Euler, exactly as
   :func:`diffspeed.sampler.sample`: ``x_{i+1} = x_i + dt_i v_i`` with ``dt_i = s_{i+1} - s_i < 0`` and
   ``v`` the model's velocity prediction ``noise - x_0``);
2. walk the quantized trajectory with every calibration sample in lockstep: at step ``i`` (earlier
   steps already corrected) the quantized model gives the guided velocity ``v_q``; the velocity that
   lands exactly on the full trajectory's next state is ``v* = (x^fp_{i+1} - x^q_i) / dt_i``;
3. fit ``v* ~ a_i[c] v_q + b_i[c]`` per latent channel ``c`` by least squares over samples and
   positions, with a ridge toward the identity ``(a, b) = (1, 0)`` worth ``ridge`` calibration samples
   (few samples cannot overfit; zero data gives the identity);
4. advance ``x^q`` with the corrected velocity and go on.

Since ``a (u + g (c - u)) + b = (a u + b) + g ((a c + b) - (a u + b))``, applying the affine to every
CFG branch's output equals applying it to the guided velocity: the runtime method
(:mod:`diffspeed.methods.error_compensation`) corrects the transformer output per forward call with
one fused multiply-add and needs no knowledge of the guidance scale.

The :class:`CompensationTable` (JSON, never pickle) records ``a`` and ``b`` per step, the step count,
the sampler settings (flow-matching Euler, sigma shift, guidance scale, CFG), the model class and
config hash and the latent channel count; :meth:`CompensationTable.check_model` refuses another model
or another step count with the fix in the message. Only the flow-matching Euler sampler is supported:
``v*`` assumes the update ``x += dt * v``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import DiffspeedError

FORMAT = "diffspeed-error-compensation/1"
SAMPLER = "flow_euler"


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def _finite_list(values: Any, n: int) -> bool:
    return (
        isinstance(values, list) and len(values) == n
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    )


@dataclass
class CompensationTable:
    """Per-step, per-channel affine velocity corrections ``v <- a[i][c] * v + b[i][c]`` for one model.

    ``model`` holds ``class``, ``config_hash`` and an optional ``name``; ``sampler`` the settings the
    table was fitted under (``sampler``, ``shift``, ``guidance_scale``, ``cfg``); ``stats`` the
    calibration errors (final-latent MSE against the full model with and without the correction).
    """

    num_steps: int
    latent_channels: int
    a: list[list[float]]
    b: list[list[float]]
    model: dict[str, Any]
    sampler: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ---- structure ---------------------------------------------------------------------------
    def validate(self, source: str = "<in-memory table>") -> None:
        def bad(problem: str) -> DiffspeedError:
            return DiffspeedError(
                f"compensation table {source} is invalid ({problem}); recreate it with "
                "diffspeed.quant.compensation.calibrate_compensation(...) and save()"
            )

        n, c = self.num_steps, self.latent_channels
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise bad(f"num_steps must be a positive integer, got {n!r}")
        if isinstance(c, bool) or not isinstance(c, int) or c <= 0:
            raise bad(f"latent_channels must be a positive integer, got {c!r}")
        for name in ("a", "b"):
            rows = getattr(self, name)
            if not isinstance(rows, list) or len(rows) != n or not all(_finite_list(r, c) for r in rows):
                raise bad(f"'{name}' must be {n} lists of {c} finite numbers")
        if not isinstance(self.model, dict) or not isinstance(self.model.get("class"), str) \
                or not isinstance(self.model.get("config_hash"), str):
            raise bad("'model' must hold 'class' and 'config_hash' strings")

    def is_identity(self) -> bool:
        return all(v == 1.0 for r in self.a for v in r) and all(v == 0.0 for r in self.b for v in r)

    # ---- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "num_steps": self.num_steps, "latent_channels": self.latent_channels,
            "model": dict(self.model), "sampler": dict(self.sampler), "a": self.a, "b": self.b,
            "calibration": dict(self.calibration), "stats": dict(self.stats),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "<in-memory table>") -> "CompensationTable":
        hint = "recreate it with diffspeed.quant.compensation.calibrate_compensation(...) and save()"
        if not isinstance(data, dict):
            raise DiffspeedError(f"compensation table {source} must be a JSON object; {hint}")
        if data.get("format") != FORMAT:
            raise DiffspeedError(
                f"compensation table {source} has format {data.get('format')!r}, this diffspeed reads {FORMAT!r}; {hint}"
            )
        try:
            table = cls(
                num_steps=data["num_steps"], latent_channels=data["latent_channels"], a=data["a"], b=data["b"],
                model=data["model"], sampler=data.get("sampler") or {}, calibration=data.get("calibration") or {},
                stats=data.get("stats") or {},
            )
        except KeyError as exc:
            raise DiffspeedError(f"compensation table {source} lacks {exc.args[0]!r}; {hint}") from None
        except DiffspeedError as exc:
            raise DiffspeedError(str(exc).replace("<in-memory table>", source)) from None
        return table

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON atomically (temp file + rename: a crash never leaves half a file)."""
        from ..calibrate import write_text_atomic

        text = json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"
        return write_text_atomic(Path(path), text, "compensation table")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CompensationTable":
        source = os.fspath(path)
        p = Path(source).expanduser()
        if not p.is_file():
            raise DiffspeedError(
                f"compensation table {source} does not exist or is not a file; create it with "
                "diffspeed.quant.compensation.calibrate_compensation(...) and table.save(path)"
            )
        try:
            data = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DiffspeedError(f"cannot read compensation table {source} ({exc}); recreate it") from None
        return cls.from_dict(data, source)

    # ---- checks ------------------------------------------------------------------------------
    def check_model(self, model: nn.Module, num_steps: int | None = None, source: str = "this table") -> None:
        """Refuse another model class/config, and (when given) another step count, naming the fix."""
        from ..calibrate import model_identity

        have = model_identity(model)
        want = self.model
        if want.get("class") != have["class"] or want.get("config_hash") != have["config_hash"]:
            made = f"{want.get('class')}/{want.get('config_hash')}" + (f" ({want['name']})" if want.get("name") else "")
            raise DiffspeedError(
                f"compensation table {source} was calibrated for {made}, this model is "
                f"{have['class']}/{have['config_hash']}; recalibrate for this model with calibrate_compensation"
            )
        if num_steps is not None:
            self.check_steps(num_steps, source)

    def check_steps(self, num_steps: int | None, source: str = "this table") -> None:
        if num_steps is None:
            raise DiffspeedError(
                f"error compensation ({source}, calibrated for {self.num_steps} steps) needs the generation's step "
                "count; use diffspeed's sampler or wrap the pipeline call in "
                f"`with diffspeed.generation(transformer, num_steps={self.num_steps}):`"
            )
        if num_steps != self.num_steps:
            raise DiffspeedError(
                f"compensation table {source} was calibrated for {self.num_steps} steps, this run has {num_steps}: "
                f"recalibrate with --steps {num_steps} (calibrate_compensation(..., num_steps={num_steps})) "
                f"or generate with {self.num_steps} steps"
            )

    def tensors(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C) tensors of ``a`` and ``b``."""
        return (torch.tensor(self.a, dtype=dtype, device=device), torch.tensor(self.b, dtype=dtype, device=device))


# ---- fitting --------------------------------------------------------------------------------------
def fit_channel_affine(
    v_q: torch.Tensor, target: torch.Tensor, ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(a, b)`` minimising ``|a v_q + b - target|^2 + ridge * m * (E[v_q^2] (a-1)^2 + b^2)``.

    ``v_q``/``target`` are (B, C, ...); the sum runs over the batch and positions (m per sample), so
    ``ridge`` is the weight of the identity prior in calibration samples. Closed-form 2x2 solve per channel.
    """
    bsz, c = v_q.shape[0], v_q.shape[1]
    v = v_q.double().transpose(0, 1).reshape(c, -1)
    y = target.double().transpose(0, 1).reshape(c, -1)
    n = v.shape[1]
    svv, sv, svy, sy = (v * v).sum(1), v.sum(1), (v * y).sum(1), y.sum(1)
    lam_a = ridge * svv / bsz
    lam_b = torch.full_like(svv, ridge * n / bsz)
    # [[svv + la, sv], [sv, n + lb]] [a, b] = [svy + la, sy]
    m00, m01, m11 = svv + lam_a, sv, n + lam_b
    r0, r1 = svy + lam_a, sy
    det = m00 * m11 - m01 * m01
    ok = det.abs() > 1e-12 * (m00 * m11).abs().clamp_min(1e-300)
    a = torch.where(ok, (r0 * m11 - m01 * r1) / torch.where(ok, det, torch.ones_like(det)), torch.ones_like(det))
    b = torch.where(ok, (m00 * r1 - m01 * r0) / torch.where(ok, det, torch.ones_like(det)), torch.zeros_like(det))
    return a, b


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """(C,) -> (1, C, 1, ...) for a (B, C, ...) latent."""
    return t.reshape(1, -1, *([1] * (ndim - 2)))


class _Trajectory:
    """Drives one transformer along flow-matching Euler exactly as :func:`diffspeed.sampler.sample`
    (batched CFG), but one step at a time so the caller can change the velocity before advancing."""

    def __init__(self, model: nn.Module, loaded: Any, seeds: Sequence[int], labels: Sequence[int], *,
                 num_steps: int, guidance_scale: float, shift: float) -> None:
        from ..context import get_context
        from ..sampler import _cat_kwargs, _device_and_dtype, flow_sigmas, initial_noise

        self.model, self.adapter = model, loaded.adapter
        self.device, self.dtype = _device_and_dtype(model)
        cond = loaded.make_condition(list(labels), self.device)
        self.use_cfg = guidance_scale > 1.0
        if self.use_cfg and cond.uncond is None:
            raise DiffspeedError("guidance scale > 1 needs an unconditional condition; use guidance_scale=1")
        self.kwargs = _cat_kwargs(cond.uncond, cond.cond) if self.use_cfg else cond.cond
        self.g = guidance_scale
        self.sigmas = flow_sigmas(num_steps, shift)
        self.x0 = initial_noise(seeds, loaded.latent_shape, self.device, torch.float32)
        self.ctx = get_context(model)
        self.num_steps = num_steps

    def begin(self) -> torch.Tensor:
        self.ctx.begin(self.num_steps, explicit=True)
        return self.x0.clone()

    def dt(self, i: int) -> float:
        return float(self.sigmas[i + 1]) - float(self.sigmas[i])

    def velocity(self, x: torch.Tensor, i: int) -> torch.Tensor:
        t = float(self.sigmas[i]) * 1000.0
        t_vec = torch.full((x.shape[0],), t, device=self.device, dtype=torch.float32)
        if not self.use_cfg:
            self.ctx.set_step(i, t, "cond")
            return self.adapter.predict(self.model, x.to(self.dtype), t_vec, self.kwargs).float()
        self.ctx.set_step(i, t, "batched")
        both = self.adapter.predict(self.model, torch.cat([x, x]).to(self.dtype), torch.cat([t_vec, t_vec]),
                                    self.kwargs).float()
        u, c = both.chunk(2)
        return u + self.g * (c - u)

    def end(self) -> None:
        self.ctx.explicit = False


@torch.no_grad()
def calibrate_compensation(
    full_model: nn.Module,
    quant_model: nn.Module,
    *,
    loaded: Any,
    seeds: Sequence[int],
    labels: Sequence[int] | None = None,
    num_steps: int = 25,
    guidance_scale: float = 1.0,
    shift: float = 1.0,
    ridge: float = 1.0,
    name: str | None = None,
) -> CompensationTable:
    """Fit the per-step, per-channel velocity correction of ``quant_model`` toward ``full_model``.

    ``loaded`` is the :class:`~diffspeed.models.bundle.LoadedModel` whose conditioning and latent shape
    are used (its own transformer is not called); ``full_model`` and ``quant_model`` must be the same
    architecture. All samples run as one batch. ``ridge`` is the identity prior's weight in samples.
    Sampling is flow-matching Euler with batched CFG (as :func:`diffspeed.sampler.generate`).
    """
    from ..calibrate import model_identity

    if not seeds:
        raise DiffspeedError("calibrate_compensation needs at least one seed")
    labels = list(labels) if labels is not None else [i % (getattr(loaded, "num_classes", None) or 1) for i in range(len(seeds))]
    if len(labels) != len(seeds):
        raise DiffspeedError(f"got {len(labels)} labels for {len(seeds)} seeds; give one label per seed")
    if not isinstance(num_steps, int) or num_steps <= 0:
        raise DiffspeedError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not (isinstance(ridge, (int, float)) and ridge >= 0 and math.isfinite(ridge)):
        raise DiffspeedError(f"ridge must be a finite number >= 0, got {ridge!r}")
    have_full, have_q = model_identity(full_model), model_identity(quant_model)
    if have_full["class"] != have_q["class"]:
        raise DiffspeedError(
            f"full_model is {have_full['class']} but quant_model is {have_q['class']}; pass the quantized copy of the same model"
        )
    opts = dict(num_steps=num_steps, guidance_scale=guidance_scale, shift=shift)
    full = _Trajectory(full_model, loaded, seeds, labels, **opts)
    quant = _Trajectory(quant_model, loaded, seeds, labels, **opts)

    # 1. the full-precision trajectory
    xs = [full.begin()]
    try:
        for i in range(num_steps):
            xs.append(xs[-1] + full.dt(i) * full.velocity(xs[-1], i))
    finally:
        full.end()

    # 2-4. walk the corrected quantized trajectory, fitting step by step
    a_rows: list[list[float]] = []
    b_rows: list[list[float]] = []
    step_mse: list[float] = []
    x = quant.begin()
    try:
        for i in range(num_steps):
            dt = quant.dt(i)
            v_q = quant.velocity(x, i)
            target = (xs[i + 1] - x) / dt
            a, b = fit_channel_affine(v_q, target, ridge)
            a_rows.append([float(v) for v in a])
            b_rows.append([float(v) for v in b])
            a_t, b_t = _channel_view(a.float(), x.dim()), _channel_view(b.float(), x.dim())
            x = x + dt * torch.addcmul(b_t, a_t, v_q)
            step_mse.append(float((x - xs[i + 1]).pow(2).mean()))
        x_corr = x
        # the uncorrected quantized run, for the record (and the caller's sanity check)
        x = quant.begin()
        for i in range(num_steps):
            x = x + quant.dt(i) * quant.velocity(x, i)
        x_plain = x
    finally:
        quant.end()
    if not torch.isfinite(x_corr).all():
        raise DiffspeedError("compensation calibration produced NaN/Inf; the quantized model is too lossy or the ridge too small")

    identity = model_identity(full_model, name or getattr(loaded, "name", None))
    return CompensationTable(
        num_steps=num_steps,
        latent_channels=int(loaded.latent_shape[0]),
        a=a_rows,
        b=b_rows,
        model=identity,
        sampler={"sampler": SAMPLER, "shift": shift, "guidance_scale": guidance_scale,
                 "cfg": "batched" if guidance_scale > 1.0 else "none"},
        calibration={"seeds": [int(s) for s in seeds], "labels": [int(v) for v in labels], "ridge": ridge},
        stats={"final_mse_uncorrected": float((x_plain - xs[-1]).pow(2).mean()),
               "final_mse_corrected": float((x_corr - xs[-1]).pow(2).mean()),
               "step_mse_corrected": step_mse},
    )


def save_table(table: CompensationTable, path: str | os.PathLike) -> Path:
    return table.save(path)


def load_table(path: str | os.PathLike) -> CompensationTable:
    return CompensationTable.load(path)
