"""Scale-out over several processes: batch splitting and CFG-parallel sampling.

Both functions run *inside* an initialised ``torch.distributed`` process group (the caller starts
it: ``torchrun`` or ``torch.multiprocessing.spawn`` plus ``dist.init_process_group``). Every rank
holds a full copy of the model; the tensors exchanged live on the model's device, so the backend
must match it: ``gloo`` for CPU models, ``nccl`` for CUDA models (one GPU per rank).

What runs where
---------------
* :func:`generate_distributed` (data parallel over the request): the (label, seed) list is cut
  into ``world_size`` contiguous, equal shards; rank ``r`` generates shard ``r`` with the ordinary
  :func:`~diffspeed.sampler.generate` and the pixels are collected with one ``all_gather`` (equal
  sizes: the number of seeds must be a multiple of the world size). Rank 0 gets the full batch in
  request order (every rank with ``all_ranks=True``); the others get ``None``. Because the sampler
  draws each sample's noise from its own seeded generator and conditions each row independently,
  sample ``i`` does not depend on how the request was split: the result equals the single-process
  one (bit-identical in fp32 on CPU in the tests).
* :func:`sample_cfg_parallel` (two ranks, classifier-free guidance): rank 0 evaluates the
  conditional branch and rank 1 the unconditional branch of every step; the two velocities are
  exchanged with one ``all_gather`` per step, and both ranks form the same guided velocity
  ``u + g (c - u)`` and do the same Euler (or scheduler) update, so their latents stay identical
  and both return the final latents. It computes exactly what the single-process
  ``cfg_mode="separate"`` sampler computes (same per-branch forwards, same combination formula).

Composition with methods
------------------------
Methods are applied on each rank's own model copy as usual (``diffspeed.apply`` /
``apply_recipe`` on every rank). Batch splitting changes nothing for them. In CFG-parallel each
rank drives its :class:`~diffspeed.context.StepContext` explicitly with its own branch name
(``"cond"`` on rank 0, ``"uncond"`` on rank 1), so a cache method keeps the per-branch state it
would keep in ``cfg_mode="separate"``, each branch on its own rank; its ``handle.stats`` count
that rank's branch only.

Errors
------
Argument problems (a seed count that the world size does not divide, a world size other than 2 for
CFG-parallel, guidance <= 1, no unconditional condition, no process group) raise
:class:`~diffspeed.errors.DiffspeedError` on every rank *before any collective*, so no rank is
left waiting. Ranks given different arguments are detected with one small collective and also
raise on every rank, and so does a shard that fails during generation (e.g. non-finite output) in
:func:`generate_distributed`. A forward that fails on one rank in the middle of CFG-parallel
sampling leaves the other waiting until the process group's timeout: give
``init_process_group`` a ``timeout``.

Not implemented yet: context (sequence) parallelism through diffusers' ``enable_parallelism``
(Ulysses / ring attention), and Ray-driven parameter sweeps over many workers.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .adapters.base import ModelAdapter, get_adapter
from .errors import DiffspeedError
from .models.bundle import Conditioning, LoadedModel
from .sampler import StepCallback, _advance, _begin_sampling, _check_finite, _device_and_dtype, _model_input, generate

__all__ = ["generate_distributed", "sample_cfg_parallel", "shard_bounds"]


def _world(group: Any | None) -> tuple[int, int]:
    """(rank, world_size) in ``group``; a clear error when no process group is initialised."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise DiffspeedError(
            "no torch.distributed process group is initialised; call "
            "torch.distributed.init_process_group (backend 'gloo' on CPU, 'nccl' on GPU) on every rank first"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _agree(values: Sequence[int], what: str, device: torch.device, group: Any | None) -> None:
    """Check that every rank passed the same integers (one small all_gather); raise on every rank."""
    import torch.distributed as dist

    mine = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        rows = [g.tolist() for g in gathered]
        raise DiffspeedError(f"ranks disagree on {what}: {rows} (every rank must get the same request)")


def _gather_equal(t: torch.Tensor, group: Any | None) -> list[torch.Tensor]:
    import torch.distributed as dist

    t = t.contiguous()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return out


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous shard of ``n`` items; ``n`` must be a multiple of world_size."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DiffspeedError(f"invalid rank {rank} for world size {world_size}")
    if n <= 0:
        raise DiffspeedError("at least one seed is needed")
    if n % world_size:
        raise DiffspeedError(
            f"{n} seeds cannot be split evenly over {world_size} ranks; give a multiple of {world_size} "
            "seeds (e.g. pad the request) or use fewer ranks"
        )
    per = n // world_size
    return rank * per, (rank + 1) * per


def generate_distributed(
    loaded: LoadedModel,
    labels: Sequence[int],
    seeds: Sequence[int],
    *,
    all_ranks: bool = False,
    group: Any | None = None,
    **sample_kwargs: Any,
) -> torch.Tensor | None:
    """Split a generation request over the ranks of ``group`` and gather the pixels.

    Call on every rank with the same ``labels``, ``seeds`` and ``sample_kwargs`` (those of
    :func:`~diffspeed.sampler.generate`). Returns the full batch (in request order) on rank 0, or on
    every rank with ``all_ranks=True``; ``None`` on the other ranks.
    """
    rank, world = _world(group)
    labels, seeds = list(labels), list(seeds)
    if len(labels) != len(seeds):
        raise DiffspeedError(f"got {len(labels)} labels for {len(seeds)} seeds; give one label per seed")
    start, stop = shard_bounds(len(seeds), world, rank)
    device = next(loaded.transformer.parameters()).device
    steps = sample_kwargs.get("num_steps", 0)
    _agree([len(seeds), int(steps) if isinstance(steps, int) else -1, *map(int, seeds), *map(int, labels)],
           "(number of seeds, steps, seeds, labels)", device, group)
    failure: BaseException | None = None
    mine = None
    try:
        mine = generate(loaded, labels[start:stop], seeds[start:stop], **sample_kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
        failure = exc
    # one flag per rank, so that a rank whose shard failed (NaN output, bad kwargs) does not leave
    # the others waiting in the gather
    flags = _gather_equal(torch.tensor([0 if failure is None else 1], device=device), group)
    if failure is not None:
        raise failure
    bad = [r for r, f in enumerate(flags) if int(f.item())]
    if bad:
        raise DiffspeedError(f"generation failed on rank(s) {bad}; see their error messages")
    parts = _gather_equal(mine, group)
    if rank == 0 or all_ranks:
        return torch.cat(parts, dim=0)
    return None


@torch.no_grad()
def sample_cfg_parallel(
    model: nn.Module,
    condition: Conditioning,
    *,
    seeds: Sequence[int],
    num_steps: int = 25,
    guidance_scale: float,
    latent_shape: Sequence[int] | None = None,
    shift: float = 1.0,
    scheduler: Any | None = None,
    adapter: ModelAdapter | None = None,
    callback: StepCallback | None = None,
    check_finite: bool = True,
    group: Any | None = None,
) -> torch.Tensor:
    """Classifier-free guidance over a 2-rank group: rank 0 runs cond, rank 1 uncond, every step.

    Call on both ranks with the same arguments; both return the same final latents (B, *latent_shape),
    equal to :func:`~diffspeed.sampler.sample` with ``cfg_mode="separate"``.
    """
    rank, world = _world(group)
    if world != 2:
        raise DiffspeedError(f"CFG-parallel needs a process group of exactly 2 ranks (cond, uncond), got {world}")
    if not isinstance(num_steps, int) or num_steps <= 0:
        raise DiffspeedError(f"steps must be a positive integer, got {num_steps}")
    if not guidance_scale > 1.0:
        raise DiffspeedError(
            f"CFG-parallel needs guidance > 1 (got {guidance_scale}); without guidance there is no "
            "uncond branch to run: use generate_distributed to split the batch instead"
        )
    if condition.uncond is None:
        raise DiffspeedError("CFG-parallel needs an unconditional condition (condition.uncond is None)")
    if not seeds:
        raise DiffspeedError("at least one seed is needed")
    adapter = adapter or get_adapter(model)
    device, dtype = _device_and_dtype(model)
    if latent_shape is None:
        latent_shape = adapter.default_latent_shape(model)
    _agree([len(seeds), num_steps, *[int(s) for s in seeds]], "(number of seeds, steps, seeds)", device, group)

    branch = "cond" if rank == 0 else "uncond"
    kwargs = condition.cond if rank == 0 else condition.uncond
    x, timesteps, sigmas, ctx = _begin_sampling(model, seeds, latent_shape, device, num_steps, shift, scheduler)
    batch = x.shape[0]
    try:
        for i, t in enumerate(timesteps):
            model_in = _model_input(scheduler, x, i)
            t_vec = torch.full((batch,), t, device=device, dtype=torch.float32)
            ctx.set_step(i, t, branch)
            mine = adapter.predict(model, model_in.to(dtype), t_vec, kwargs).float()
            out_c, out_u = _gather_equal(mine, group)  # [rank 0 = cond, rank 1 = uncond]
            out = out_u + guidance_scale * (out_c - out_u)  # the same expression as the sampler
            x = _advance(scheduler, sigmas, i, out, x)
            if callback is not None:
                callback(i, len(timesteps), t, x)
    finally:
        ctx.explicit = False
    if check_finite:
        _check_finite(x)
    return x


# ---- torchrun entry (the CLI) ----------------------------------------------------------------------

def init_from_env(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world, device) for a process started by ``torchrun``: initialise the default process
    group from the environment (gloo on CPU, nccl on CUDA, each rank on GPU ``LOCAL_RANK``) when
    ``WORLD_SIZE`` > 1; ``(0, 1, device)`` otherwise (a plain single process)."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def bench_distributed(loaded: LoadedModel, recipes: Sequence[Any], seeds: Sequence[int], labels: Sequence[int],
                      **bench_kwargs: Any) -> list[dict[str, Any]] | None:
    """Split the benchmark's samples over the ranks (each rank measures its shard with
    :func:`~diffspeed.bench.runner.run_bench`) and gather the rows on rank 0 (``None`` elsewhere), each
    tagged with ``rank`` and its ``seeds``. The world size must divide the number of samples."""
    import torch.distributed as dist

    from .bench.runner import run_bench

    rank, world = _world(None)
    seeds, labels = list(seeds), list(labels)
    start, stop = shard_bounds(len(seeds), world, rank)
    rows = run_bench(loaded, list(recipes), seeds=seeds[start:stop], labels=labels[start:stop], **bench_kwargs)
    for row in rows:
        row["rank"], row["world_size"], row["seeds"] = rank, world, seeds[start:stop]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, rows)
    return [r for part in gathered for r in part] if rank == 0 else None


def finish_from_env(world: int) -> None:
    """End a ``torchrun`` process cleanly: a barrier, then destroy the default group (a group left to
    interpreter exit can abort in gloo's threads and fail the launch)."""
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
