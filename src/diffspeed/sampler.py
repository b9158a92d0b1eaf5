"""Denoising loop for a bare transformer: flow-matching Euler or any diffusers scheduler, CFG, seeds.

Flow matching (rectified flow, as SD3/FLUX/Wan): ``x_t = (1 - s) x_0 + s * noise`` and the model
predicts the velocity ``noise - x_0``; Euler integrates from ``s = 1`` to ``s = 0``. The model is
called with ``timestep = s * 1000`` (the adapter rescales for models such as Flux).

Noise for each sample comes from its own seeded CPU generator, so a sample is the same whatever
batch it is in, on any device.

The sampler drives the model's :class:`~diffspeed.context.StepContext` explicitly (no
device-to-host syncs): it declares the generation, then the step index and CFG branch before every
forward. A user's diffusers pipeline is its own sampler: attach methods to ``pipe.transformer``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from .adapters.base import ModelAdapter, get_adapter
from .context import get_context
from .errors import DiffspeedError, NonFiniteOutputError
from .models.bundle import Conditioning

# callback(step_index, num_steps, timestep, latents)
StepCallback = Callable[[int, int, float, torch.Tensor], None]


def flow_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """num_steps + 1 noise levels from 1 to 0, optionally time-shifted as SD3 (shift > 1 = more noise)."""
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    if shift != 1.0:
        s = shift * s / (1 + (shift - 1) * s)
    return s


def initial_noise(
    seeds: Sequence[int], latent_shape: Sequence[int], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """(B, *latent_shape) standard normal noise; row i depends only on seeds[i]."""
    rows = [torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The model's device and compute dtype.

    The compute dtype is the first floating dtype other than float32: some classes keep a few
    modules in float32 (diffusers' _keep_in_fp32_modules).
    """
    device = next(model.parameters()).device
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32), torch.float32)
    return device, dtype


def _begin_sampling(
    model: nn.Module,
    seeds: Sequence[int],
    latent_shape: Sequence[int],
    device: torch.device,
    num_steps: int,
    shift: float,
    scheduler: Any | None,
) -> tuple[torch.Tensor, list[float], Any, Any]:
    """Initial latents, timesteps and flow sigmas (None with a scheduler); declares the generation.

    Returns ``(x, timesteps, sigmas, ctx)``; ``ctx`` (the model's step context) has begun an explicit
    generation of ``len(timesteps)`` steps.
    """
    x = initial_noise(seeds, latent_shape, device, torch.float32)
    if scheduler is not None:
        scheduler.set_timesteps(num_steps, device=device)
        timesteps = [float(t) for t in scheduler.timesteps.detach().cpu()]
        x = x * float(getattr(scheduler, "init_noise_sigma", 1.0))
        sigmas = None
    else:
        sigmas = flow_sigmas(num_steps, shift)
        timesteps = [float(s) * 1000.0 for s in sigmas[:-1]]
    ctx = get_context(model)
    ctx.begin(len(timesteps), explicit=True)
    return x, timesteps, sigmas, ctx


def _model_input(scheduler: Any | None, x: torch.Tensor, i: int) -> torch.Tensor:
    if scheduler is not None and hasattr(scheduler, "scale_model_input"):
        return scheduler.scale_model_input(x, scheduler.timesteps[i])
    return x


def _advance(scheduler: Any | None, sigmas: Any, i: int, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One step: flow-matching Euler (no scheduler) or the scheduler's own step."""
    if scheduler is None:
        return x + (float(sigmas[i + 1]) - float(sigmas[i])) * out
    return scheduler.step(out, scheduler.timesteps[i], x, return_dict=False)[0]


def _check_finite(x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise NonFiniteOutputError(
            "the model produced NaN/Inf latents; check the recipe (e.g. too aggressive quantization) "
            "and the dtype"
        )


def _cat_kwargs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, va in a.items():
        vb = b[key]
        if isinstance(va, torch.Tensor) and va.dim() > 0:
            out[key] = torch.cat([va, vb], dim=0)
        else:
            out[key] = va
    return out


def _validate(num_steps: int, guidance_scale: float, cfg_mode: str) -> None:
    if not isinstance(num_steps, int) or num_steps <= 0:
        raise DiffspeedError(f"steps must be a positive integer, got {num_steps}")
    if guidance_scale < 0:
        raise DiffspeedError(f"guidance scale must be >= 0, got {guidance_scale}")
    if cfg_mode not in ("batched", "separate"):
        raise DiffspeedError(f"cfg_mode must be 'batched' or 'separate', got {cfg_mode!r}")


@torch.no_grad()
def sample(
    model: nn.Module,
    condition: Conditioning,
    *,
    seeds: Sequence[int],
    latent_shape: Sequence[int] | None = None,
    num_steps: int = 25,
    guidance_scale: float = 1.0,
    shift: float = 1.0,
    scheduler: Any | None = None,
    cfg_mode: str = "batched",
    adapter: ModelAdapter | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
    check_finite: bool = True,
) -> torch.Tensor:
    """Run the denoising loop and return the final latents (B, *latent_shape).

    ``guidance_scale`` > 1 uses classifier-free guidance with ``condition.uncond``;
    ``cfg_mode="batched"`` runs [uncond, cond] as one batch, ``"separate"`` as two calls per step
    (each branch keeps its own method state). ``scheduler`` may be any diffusers scheduler
    (``set_timesteps``/``step``); by default flow-matching Euler with ``shift``.
    """
    _validate(num_steps, guidance_scale, cfg_mode)
    adapter = adapter or get_adapter(model)
    use_cfg = guidance_scale > 1.0
    if use_cfg and condition.uncond is None:
        raise DiffspeedError("guidance scale > 1 needs an unconditional condition (condition.uncond is None)")
    device, dtype = _device_and_dtype(model)
    if latent_shape is None:
        latent_shape = adapter.default_latent_shape(model)
    if not seeds:
        raise DiffspeedError("at least one seed is needed")
    x, timesteps, sigmas, ctx = _begin_sampling(model, seeds, latent_shape, device, num_steps, shift, scheduler)
    batch = x.shape[0]

    cond_kw = condition.cond
    uncond_kw = condition.uncond
    batched_kw = _cat_kwargs(uncond_kw, cond_kw) if use_cfg and cfg_mode == "batched" else None

    steps_iter: Any = range(len(timesteps))
    bar = None
    if progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("denoising"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                       TimeElapsedColumn(), transient=True)
        task = bar.add_task("steps", total=len(timesteps))
        bar.start()
    try:
        for i in steps_iter:
            t = timesteps[i]
            model_in = _model_input(scheduler, x, i)
            t_vec = torch.full((batch,), t, device=device, dtype=torch.float32)
            if not use_cfg:
                ctx.set_step(i, t, "cond")
                out = adapter.predict(model, model_in.to(dtype), t_vec, cond_kw).float()
            elif cfg_mode == "batched":
                ctx.set_step(i, t, "batched")
                both = adapter.predict(model, torch.cat([model_in, model_in]).to(dtype), torch.cat([t_vec, t_vec]), batched_kw).float()
                out_u, out_c = both.chunk(2)
                out = out_u + guidance_scale * (out_c - out_u)
            else:
                ctx.set_step(i, t, "cond")
                out_c = adapter.predict(model, model_in.to(dtype), t_vec, cond_kw).float()
                ctx.set_step(i, t, "uncond")
                out_u = adapter.predict(model, model_in.to(dtype), t_vec, uncond_kw).float()
                out = out_u + guidance_scale * (out_c - out_u)
            x = _advance(scheduler, sigmas, i, out, x)
            if callback is not None:
                callback(i, len(timesteps), t, x)
            if bar is not None:
                bar.update(task, advance=1)
    finally:
        if bar is not None:
            bar.stop()
        ctx.explicit = False
    if check_finite:
        _check_finite(x)
    return x


def generate(
    loaded: "LoadedModel",
    labels: Sequence[int],
    seeds: Sequence[int],
    **kwargs: Any,
) -> torch.Tensor:
    """Sample a :class:`~diffspeed.models.bundle.LoadedModel` and return pixels in [0, 1]."""
    if len(labels) != len(seeds):
        raise DiffspeedError(f"got {len(labels)} labels for {len(seeds)} seeds; give one label per seed")
    device = next(loaded.transformer.parameters()).device
    condition = loaded.make_condition(list(labels), device)
    latents = sample(loaded.transformer, condition, seeds=seeds, latent_shape=loaded.latent_shape,
                     adapter=loaded.adapter, **kwargs)
    return loaded.to_pixels(latents)


from .models.bundle import LoadedModel  # noqa: E402  (type only; avoids a cycle at import time)
