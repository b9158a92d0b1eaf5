"""Context (sequence) parallelism through diffusers' own API, validated and with diffspeed's methods checked.

:func:`enable_context_parallel` shards one transformer's *token sequence* over the ranks of the
default ``torch.distributed`` process group with diffusers' ``ContextParallelConfig`` and
``ModelMixin.enable_parallelism``: every rank holds the full weights, the model's context-parallel
plan (``_cp_plan``) splits the sequence at the model's entry and gathers it at ``proj_out``, and
attention exchanges the shards:

* **Ulysses** (``ulysses_degree``): all-to-all from "my tokens, all heads" to "all tokens, my
  heads", ordinary attention, all-to-all back. The number of attention heads must be divisible by
  the degree. Uses ``all_to_all_single``.
* **Ring** (``ring_degree``): every rank attends to every rank's keys/values in turn and merges the
  partial results with their log-sum-exp. Needs an attention backend that returns the LSE.

Call it on every rank, with the same arguments, after ``init_process_group``; then sample as usual
(the sampler, the adapters and :func:`~diffspeed.sampler.generate` are unchanged): every rank
feeds the same full inputs and gets the same full output. ``ulysses_degree * ring_degree`` must
equal the world size (or the sizes of the ``"ring"`` / ``"ulysses"`` dimensions of ``mesh``, a
``DeviceMesh`` when context parallelism shares the ranks with another kind of parallelism, in which
case the degree must divide the world size). The returned handle's ``remove()`` undoes it.

What runs where (diffusers 0.42.1, torch 2.13)
-----------------------------------------------
* Models: the transformer classes with a ``_cp_plan`` (:func:`supported_model_classes`: Flux, Flux2,
  Wan, ChronoEdit, LTX, LTX2, QwenImage, Helios, MiniMax-H3, ...). In diffspeed's zoo:
  ``tiny-flux`` / ``tiny-wan`` / ``wan-1.3b``; **not** DiT, PixArt, SD3 or CogVideoX (no plan:
  refused, with the list).
* Attention backend: diffusers' ``native`` backend (SDPA, the default) supports Ulysses on any
  device, CPU included. Ring needs the log-sum-exp of every partial attention, which ``native``
  cannot return ("Native attention does not support return_lse=True"): ring needs a
  CUDA backend (``flash``, ``_native_cudnn``, ``_native_flash``, ``sage``, set with
  ``model.set_attention_backend(...)`` first), so **ring cannot run on CPU**; it is refused there
  up front instead of failing in the first forward.
* Process group backend: ``gloo`` for CPU models (its all-to-all and all-gather work for Ulysses),
  ``nccl`` for CUDA models (one GPU per rank).
* CPU workaround: diffusers 0.42.1 computes the rank's device as
  ``rank % torch.accelerator.device_count()``, a ``ZeroDivisionError`` on a CPU-only torch build
  (device count 0). This module builds the mesh itself and, only for the duration of the
  ``enable_parallelism`` call and only when no accelerator is present, makes
  ``torch.accelerator.device_count`` report 1 so that the recorded device is ``cpu:0``.
* Sequence length: every split input (the image/video tokens after patching, the text tokens of
  models that split them, e.g. Flux) must be divisible by ``ulysses_degree * ring_degree``. A
  forward whose inputs are not is refused with a :class:`DiffspeedError` before any collective
  (diffusers itself only has a bare ``assert``); pass ``ulysses_anything=True`` /
  ``ring_anything=True`` (diffusers' padding modes) to accept any length instead.

Compatibility with diffspeed's methods (:data:`METHOD_COMPATIBILITY`)
--------------------------------------------------------------------
===================================  ==========  =================================================
method                               with CP     why
===================================  ==========  =================================================
``slicing``                          yes         token-wise and exact; its attention chunking
                                                 passes context-parallel calls through unchanged
``compile``                          yes         apply it *after* enable_context_parallel
                                                 (diffusers supports compiling a CP model; not
                                                 measured by diffspeed yet)
``step_cache``, ``erta_cache``       no          they decide per step from signals each rank
                                                 computes on its own shard: ranks can decide
                                                 differently, and a rank that skips the forward
                                                 skips its collectives (hang)
``block_cache``, ``lazy``            no          block hooks see one shard; per-rank skip
                                                 decisions desynchronise the collectives (hang)
``token_merge``, ``motion_cache``,   no          they change the sequence length inside the
``region_adaptive``                              block stack: the split plan and the all-to-all
                                                 assume the full sequence
``sparse_attention``                 no          replaces the attention computation, so it would
                                                 attend within the local shard only (wrong output)
``quantize_``, ``ptq_``,             no          torchao tensor-subclass weights are not validated
``error_compensation``                           under diffusers' CP hooks/functional collectives
``fuse_qkv``                         no          swaps the attention processors (SD3's fused one
                                                 calls SDPA outside diffusers' CP dispatch); not
                                                 validated
===================================  ==========  =================================================

Methods not in the table are refused. Incompatible methods already applied to the model are
refused by :func:`enable_context_parallel`; :func:`check_methods_compatible` checks a recipe
before you apply it. (Applying an incompatible method *after* enabling CP is not intercepted: the
methods do not know about CP; check the recipe first.)

Errors
------
Every argument problem raises :class:`DiffspeedError` on **every** rank: each rank validates
locally, then the ranks exchange one small tensor (pass/fail and the degrees) so a rank whose input
was fine still raises when another rank's was not (no rank is left waiting in a later collective).
A missing process group and a missing diffusers API raise before any collective.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .errors import DiffspeedError

__all__ = [
    "METHOD_COMPATIBILITY", "ContextParallelHandle", "check_methods_compatible", "enable_context_parallel",
    "supported_model_classes",
]

_HANG = ("each rank decides from signals computed on its own shard, so ranks can decide differently; a rank that "
         "skips a forward skips its collectives and the others hang")
# method name -> (compatible, why)
METHOD_COMPATIBILITY: dict[str, tuple[bool, str]] = {
    "slicing": (True, "token-wise and exact; its attention chunking passes context-parallel calls through"),
    "compile": (True, "apply it after enable_context_parallel (diffusers supports compiling a CP model)"),
    "step_cache": (False, f"a step-level cache of the transformer output: {_HANG}"),
    "erta_cache": (False, f"a step-level cache of the transformer output: {_HANG}"),
    "block_cache": (False, f"a block-level cache hooked on the blocks: {_HANG}"),
    "lazy": (False, f"skips blocks from per-block signals: {_HANG}"),
    "token_merge": (False, "changes the sequence length inside the block stack; the CP split plan and the "
                           "attention all-to-all assume the full sequence"),
    "motion_cache": (False, "recomputes a token subset (changes the sequence length inside the block stack)"),
    "region_adaptive": (False, "recomputes a token subset (changes the sequence length inside the block stack)"),
    "sparse_attention": (False, "replaces the attention computation: it would attend within the local shard only"),
    "quantize_": (False, "quantized (torchao tensor-subclass) weights are not validated under diffusers' CP hooks"),
    "ptq_": (False, "quantized (torchao tensor-subclass) weights are not validated under diffusers' CP hooks"),
    "error_compensation": (False, "belongs to quantization, which is not validated under context parallelism"),
    "fuse_qkv": (False, "swaps the attention processors (SD3's fused one calls SDPA directly, outside diffusers' "
                        "CP dispatch); not validated under context parallelism"),
}

# attention backends that support context parallelism and return the log-sum-exp that ring needs
_RING_BACKENDS = ("flash", "flash_hub", "flash_varlen_hub", "_flash_3_hub", "_flash_3_varlen_hub",
                  "_native_cudnn", "_native_flash", "_native_npu", "sage", "sage_hub")


def _method_names(methods: Any) -> list[str]:
    from .recipe import Recipe

    if isinstance(methods, Recipe):
        return [m.method for m in methods.methods]
    if isinstance(methods, dict):
        return list(methods)
    names = []
    for m in methods:
        names.append(m if isinstance(m, str) else getattr(m, "method", None) or getattr(m.config, "method"))
    return names


def check_methods_compatible(methods: Any) -> None:
    """Raise :class:`DiffspeedError` naming every method in ``methods`` that cannot run under CP.

    ``methods``: a :class:`~diffspeed.recipe.Recipe`, method configs, method names, or the dict of
    :func:`~diffspeed.methods.base.applied_methods`.
    """
    bad = []
    for name in _method_names(methods):
        ok, why = METHOD_COMPATIBILITY.get(name, (False, "not in diffspeed's context-parallel compatibility matrix"))
        if not ok:
            bad.append(f"{name!r} ({why})")
    if bad:
        raise DiffspeedError("context parallelism cannot be combined with " + "; ".join(bad))


@functools.lru_cache(maxsize=1)
def supported_model_classes() -> tuple[str, ...]:
    """Names of the diffusers model classes with a context-parallel plan (``_cp_plan``)."""
    import diffusers

    names = []
    for name in dir(diffusers):
        if "Transformer" not in name or not name.endswith("Model"):
            continue
        try:
            cls = getattr(diffusers, name)
        except Exception:  # noqa: BLE001 - a class whose optional dependency is missing
            continue
        if isinstance(cls, type) and getattr(cls, "_cp_plan", None):
            names.append(name)
    return tuple(sorted(names))


@dataclass
class ContextParallelHandle:
    """Returned by :func:`enable_context_parallel`; ``remove()`` makes the model single-process again."""

    model: nn.Module
    ulysses_degree: int
    ring_degree: int
    plan: dict
    _hooks: list = field(default_factory=list)

    @property
    def degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    def remove(self) -> None:
        from diffusers.hooks.context_parallel import remove_context_parallel

        if getattr(self.model, "_parallel_config", None) is None:
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        remove_context_parallel(self.model, self.plan)
        for module in self.model.modules():
            processor = getattr(module, "processor", None)
            if processor is not None and hasattr(processor, "_parallel_config"):
                processor._parallel_config = None
        self.model._parallel_config = None

    def __enter__(self) -> "ContextParallelHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# ---- validation ----------------------------------------------------------------------------------


def _attention_backend(model: nn.Module) -> str | None:
    """The attention backend name of the model's first dispatching processor (None if it has none)."""
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    except ImportError:
        return None
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is None or not hasattr(processor, "_attention_backend"):
            continue
        backend = processor._attention_backend
        if backend is None:
            backend, _ = _AttentionBackendRegistry.get_active_backend()
        return getattr(backend, "value", str(backend))
    return None


def _local_problem(model: nn.Module, ulysses_degree: Any, ring_degree: Any, mesh: Any, world: int) -> str | None:
    """What is wrong on this rank, or None. No collectives."""
    for name, value in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return f"{name} must be a positive integer, got {value!r}"
    degree = ulysses_degree * ring_degree
    if degree == 1:
        return "ulysses_degree * ring_degree is 1: nothing to parallelise (give a degree > 1)"
    if mesh is None and degree != world:
        return (f"ulysses_degree * ring_degree = {ulysses_degree} * {ring_degree} = {degree} must equal the world "
                f"size {world} (or pass a DeviceMesh with 'ring' and 'ulysses' dimensions to use part of the ranks)")
    if mesh is not None:
        names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
        if "ring" not in names or "ulysses" not in names:
            return f"mesh must have dimensions named 'ring' and 'ulysses', got {names}"
        sizes = (mesh["ring"].size(), mesh["ulysses"].size())
        if sizes != (ring_degree, ulysses_degree):
            return f"mesh has ring x ulysses = {sizes[0]} x {sizes[1]}, but the degrees are {ring_degree} x {ulysses_degree}"
        if world % degree:
            return f"the context-parallel degree {degree} must divide the world size {world}"
    cls = type(getattr(model, "_orig_mod", model))
    plan = getattr(cls, "_cp_plan", None)
    if not plan:
        return (f"{cls.__name__} has no context-parallel plan (_cp_plan) in diffusers; supported model classes: "
                f"{', '.join(supported_model_classes())}")
    if not hasattr(model, "enable_parallelism"):
        return f"{cls.__name__} is not a diffusers ModelMixin with enable_parallelism"
    if getattr(model, "_parallel_config", None) is not None:
        return f"parallelism is already enabled on this {cls.__name__}; remove() its handle first"
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if ulysses_degree > 1 and isinstance(heads, int) and heads % ulysses_degree:
        return (f"Ulysses splits the attention heads: {cls.__name__} has {heads} heads, not divisible by "
                f"ulysses_degree={ulysses_degree} (use a divisor of {heads}, or ring_degree)")
    if ring_degree > 1:
        backend = _attention_backend(model)
        if backend is not None and backend not in _RING_BACKENDS:
            return (f"ring attention needs an attention backend that returns the log-sum-exp; this model uses "
                    f"{backend!r}, which does not (diffusers: 'Native attention does not support return_lse=True'). "
                    f"On CUDA call model.set_attention_backend('_native_cudnn' or 'flash') first; on CPU there is "
                    f"no such backend: use ulysses_degree instead")
    from .methods.base import applied_methods

    applied = applied_methods(model)
    if applied:
        try:
            check_methods_compatible(applied)
        except DiffspeedError as exc:
            return f"{exc}; remove those methods before enabling context parallelism"
        if "compile" in applied:
            return "compile is applied already: enable context parallelism first, then apply compile"
    try:
        p = next(model.parameters())
    except StopIteration:
        return "the model has no parameters"
    import torch.distributed as dist

    backend = dist.get_backend()
    if p.device.type == "cpu" and backend != "gloo":
        return f"the model is on the CPU: use the 'gloo' process group backend (got {backend!r})"
    if p.device.type == "cuda" and backend not in ("nccl", "cuda:nccl"):
        return f"the model is on CUDA: use the 'nccl' process group backend (got {backend!r})"
    return None


def _agree_or_raise(problem: str | None, ulysses_degree: Any, ring_degree: Any, device: torch.device) -> None:
    """One all_gather of (failed, degrees); raise on every rank if any rank failed or they disagree."""
    import torch.distributed as dist

    def as_int(v: Any) -> int:
        return v if isinstance(v, int) else -1

    mine = torch.tensor([1 if problem else 0, as_int(ulysses_degree), as_int(ring_degree)], dtype=torch.int64,
                        device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    if problem:
        raise DiffspeedError(problem)
    bad = [r for r, g in enumerate(gathered) if int(g[0])]
    if bad:
        raise DiffspeedError(f"enable_context_parallel failed on rank(s) {bad}; see their error messages")
    rows = [tuple(g[1:].tolist()) for g in gathered]
    if len(set(rows)) > 1:
        raise DiffspeedError(f"ranks disagree on (ulysses_degree, ring_degree): {rows}")


# ---- sequence-length checks at forward time --------------------------------------------------------


def _param_names(module: nn.Module) -> list[str]:
    forward = type(module).forward
    return [n for n in inspect.signature(forward).parameters if n != "self"]


def _tokens(model: nn.Module, hidden: torch.Tensor) -> int | None:
    """Image/video tokens of the model's input ``hidden`` after patching (None if unknown)."""
    if hidden.dim() == 3:
        return hidden.shape[1]
    patch = getattr(getattr(model, "config", None), "patch_size", None)
    if patch is None:
        return None
    spatial = list(hidden.shape[2:])
    patch = [patch] * min(2, len(spatial)) if isinstance(patch, int) else list(patch)
    patch = [1] * (len(spatial) - len(patch)) + patch
    return math.prod(s // p for s, p in zip(spatial, patch))


def _install_checks(model: nn.Module, plan: dict, degree: int) -> list:
    """Forward pre-hooks refusing inputs whose split dimension the degree does not divide."""
    from diffusers.hooks.context_parallel import _get_submodule_by_name
    from diffusers.models._modeling_parallel import ContextParallelInput

    handles = []

    def make_hook(module: nn.Module, inputs: dict, is_root: bool):  # noqa: ANN202
        names = _param_names(module)

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            def value(name: str) -> Any:
                if name in kwargs:
                    return kwargs[name]
                idx = names.index(name) if name in names else None
                return args[idx] if idx is not None and idx < len(args) else None

            if is_root:
                hidden = value("hidden_states")
                n = _tokens(model, hidden) if isinstance(hidden, torch.Tensor) else None
                if n is not None and n % degree:
                    raise DiffspeedError(
                        f"context parallelism over {degree} ranks needs a sequence length divisible by {degree}; "
                        f"this input has {n} tokens (shape {tuple(hidden.shape)}): change the resolution/frames, or "
                        f"enable with ulysses_anything=True / ring_anything=True"
                    )
            for name, cpi in inputs.items():
                if not isinstance(cpi, ContextParallelInput) or cpi.split_output:
                    continue
                x = value(name)
                if not isinstance(x, torch.Tensor) or (cpi.expected_dims is not None and x.dim() != cpi.expected_dims):
                    continue
                if x.shape[cpi.split_dim] % degree:
                    raise DiffspeedError(
                        f"context parallelism over {degree} ranks splits {type(mod).__name__}'s {name!r} along dim "
                        f"{cpi.split_dim}, of size {x.shape[cpi.split_dim]} (shape {tuple(x.shape)}), not divisible "
                        f"by {degree}; change the input size or enable with ulysses_anything=True / ring_anything=True"
                    )

        return hook

    if "" not in plan:
        handles.append(model.register_forward_pre_hook(make_hook(model, {}, True), with_kwargs=True))
    for module_id, entry in plan.items():
        if not isinstance(entry, dict):
            continue
        subs = _get_submodule_by_name(model, module_id) if module_id else model
        for sub in subs if isinstance(subs, list) else [subs]:
            handles.append(sub.register_forward_pre_hook(make_hook(sub, entry, sub is model), with_kwargs=True))
    return handles


@contextlib.contextmanager
def _cpu_device_count_fix() -> Iterator[None]:
    """diffusers 0.42.1 does ``rank % torch.accelerator.device_count()``: 0 on a CPU-only build. Report 1 meanwhile."""
    acc = getattr(torch, "accelerator", None)
    if acc is None or acc.device_count() > 0:
        yield
        return
    original = acc.device_count
    acc.device_count = lambda: 1
    try:
        yield
    finally:
        acc.device_count = original


# ---- the entry point -------------------------------------------------------------------------------


def enable_context_parallel(
    model: nn.Module,
    *,
    ulysses_degree: int = 1,
    ring_degree: int = 1,
    mesh: Any = None,
    ulysses_anything: bool = False,
    ring_anything: bool = False,
    check_inputs: bool = True,
) -> ContextParallelHandle:
    """Shard ``model``'s sequence over the default process group with diffusers' context parallelism.

    Call on every rank with the same arguments (see the module docstring for the requirements and
    the compatibility matrix). Returns a handle whose ``remove()`` undoes it. ``check_inputs``
    installs forward pre-hooks that refuse sequence lengths the degree does not divide.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise DiffspeedError(
            "context parallelism needs an initialised torch.distributed process group: call "
            "init_process_group ('gloo' on CPU, 'nccl' on GPU) on every rank first"
        )
    try:
        from diffusers import ContextParallelConfig
    except ImportError:
        import diffusers

        raise DiffspeedError(
            f"diffusers {diffusers.__version__} has no ContextParallelConfig; context parallelism needs "
            "a newer diffusers (tested with 0.42.1)"
        ) from None
    world = dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() in ("nccl", "cuda:nccl") \
        else torch.device("cpu")
    try:
        problem = _local_problem(model, ulysses_degree, ring_degree, mesh, world)
    except Exception as exc:  # noqa: BLE001 - any local failure must still reach the collective below
        problem = f"{type(exc).__name__}: {exc}"
    _agree_or_raise(problem, ulysses_degree, ring_degree, device)

    param_device = next(model.parameters()).device
    if mesh is None:
        mesh = torch.distributed.device_mesh.init_device_mesh(
            param_device.type, (ring_degree, ulysses_degree), mesh_dim_names=("ring", "ulysses"))
    extra = {k: True for k, v in (("ulysses_anything", ulysses_anything), ("ring_anything", ring_anything)) if v}
    config = ContextParallelConfig(ulysses_degree=ulysses_degree, ring_degree=ring_degree, mesh=mesh, **extra)
    plan = type(getattr(model, "_orig_mod", model))._cp_plan
    with _cpu_device_count_fix():
        model.enable_parallelism(config=config)
    handle = ContextParallelHandle(model, ulysses_degree, ring_degree, plan)
    if check_inputs and not (ulysses_anything or ring_anything):
        handle._hooks = _install_checks(model, plan, ulysses_degree * ring_degree)
    return handle
