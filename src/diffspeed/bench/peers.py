"""Peer caching methods (diffusers hooks, cache-dit) on a bare diffusers transformer driven by diffspeed's sampler.

Side-by-side benchmarks need the peers on exactly the same weights, seeds, device and sampler as
diffspeed's own methods, with every peer *really* doing what it claims. This module is a registry of
:class:`PeerMethod` entries; ``PEERS[name].apply(transformer, settings, run)`` installs the peer and
returns a :class:`PeerHandle`, a callable that removes it again (outputs bit-identical afterwards).

=====================  ==========  ================================================================
peer                   family      what it skips
=====================  ==========  ================================================================
``fbc``                diffusers   FirstBlockCache: every block after the first when the first
                                   block's residual changed less than ``threshold``
``pab``                diffusers   PyramidAttentionBroadcast: attention outputs reused every N calls
                                   inside a timestep range
``fastercache``        diffusers   FasterCache: attention reuse + the uncond half of batched CFG
``taylorseer``         diffusers   TaylorSeerCache: attention outputs forecast between refreshes
``taylorseer_lite``    diffusers   TaylorSeerCache lite mode: blocks skipped, ``proj_out`` forecast
``magcache``           diffusers   MagCache: whole block stack when the calibrated magnitude-ratio
                                   error is small (needs ``mag_ratios``: :meth:`PeerMethod.calibrate`)
``dbcache``            cache-dit   DBCache (F1B0): middle blocks when the Fn residual barely changed
``dbcache_taylorseer`` cache-dit   DBCache + TaylorSeer calibrator (forecast instead of reuse)
=====================  ==========  ================================================================

What it takes to make them run honestly outside their pipelines (diffusers 0.42.1, cache-dit 1.5.3):

* **Cache context.** diffusers' stateful hooks keep their state in a ``StateManager`` that raises
  "No cache context is set" unless the call runs inside ``CacheMixin.cache_context(name)`` (the
  pipeline does that); DiT has no ``CacheMixin`` at all. Every diffusers peer here wraps the
  transformer forward so each call runs inside a context named after diffspeed's CFG branch
  (``get_context(model).branch``: ``"cond"`` / ``"uncond"`` for separate calls, ``"batched"`` for
  one [uncond, cond] batch), so the branches keep separate states as in the pipelines. The
  context is set with ``diffusers.hooks.hooks._set_cache_context`` (0.42) or
  ``HookRegistry._set_context`` (older releases).
* **Reset per generation.** Pipelines reset hook state after each call; here the wrapper calls
  ``HookRegistry.reset_stateful_hooks`` when diffspeed's step context starts a new generation, and
  cache-dit's persistent transformer-only context is refreshed (``cache_dit.refresh_context``)
  with the generation's step count.
* **Silent no-ops.** TaylorSeerCache's default identifiers (``"^blocks.*attn"`` under
  ``re.fullmatch``) match no module of DiT, PixArt or Wan (their attention modules are ``attn1`` /
  ``attn2``): the default config hooks nothing and the output is the full model's. With
  ``cache_identifiers="auto"`` (default here) the defaults are tried first and, when they match
  nothing, ``^(transformer_blocks|blocks|single_transformer_blocks)\\.\\d+\\.attn\\d*$`` is used
  (noted on the handle). Every diffusers peer checks after applying that it registered at least one
  hook and raises :class:`PeerError` otherwise.
* **CFG.** FasterCache's uncond skipping assumes one batched [uncond, cond] call: with separate
  calls it splits a single branch in two, so it is refused (``cfg_mode="separate"``). Its list of
  batch-concatenated keyword arguments lacks DiT's ``class_labels``, which is added. PAB keeps one
  cache per attention module for both CFG branches (its design): with separate calls the uncond
  call can reuse the cond call's attention output (noted on the handle). cache-dit is told whether
  cond/uncond come as separate calls (``enable_separate_cfg``; cond first, as diffspeed's sampler).
* **cache-dit block counts.** Its default F8B0 asserts on models with fewer than 9 blocks; the
  recommended setting here is its own example CLI's default (``--Fn 1 --Bn 0 --rdt 0.12 --ws 8
  --mcc 3``). cache-dit patches DiT's forward and leaves it patched (plus a ``_norm1_emb``
  submodule) after ``disable_cache``; the handle restores every module's ``__dict__``,
  ``_modules``, ``_parameters`` and ``_buffers`` to what they were before applying.

**Counting real work.** A hook that silently does nothing looks lossless, and a skipped block still
passes through ``Module.__call__`` (the caches replace ``forward``), so block-level pre-hooks cannot
tell. :class:`WorkCounter` puts forward pre-hooks on *leaf* linears, which only run when the work
really runs: ``to_q`` of every attention module (attention work) and the last linear of every block
(its feed-forward output, i.e. the block's MLP ran). Each counts calls and token rows
(``x.numel() / x.shape[-1]``), so a halved batch (FasterCache's uncond skip) counts as half.
:func:`skipped_fraction` = ``1 - executed rows / full model's rows`` over both kinds of leaves
(``attention`` and ``mlp`` fractions are reported separately too). The same counter measures
diffspeed's own methods in ``benchmarks/caching.py``.

A peer that cannot run on a model or run configuration raises :class:`PeerError` whose message
says why (see :meth:`PeerMethod.not_supported_reasons`); the benchmark turns it into an error row.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import re
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..adapters.base import get_adapter
from ..context import get_context
from ..errors import DiffspeedError
from ..hooks import wrap_forward

__all__ = [
    "PEERS",
    "PeerError",
    "PeerHandle",
    "PeerMethod",
    "RunInfo",
    "WorkCounter",
    "apply_peer",
    "count_work",
    "get_peer",
    "peer_names",
    "peer_stats",
    "skipped_fraction",
]


class PeerError(DiffspeedError):
    """A peer cannot run here (unsupported model/run, missing package, or it would do nothing)."""


@dataclass(frozen=True)
class RunInfo:
    """How the sampler will drive the model: peers that must know it up front read it here.

    ``num_steps`` (MagCache's ratio schedule, cache-dit's context), ``cfg_mode`` and
    ``guidance_scale`` (whether cond/uncond come as separate calls or one batch).
    """

    num_steps: int | None = None
    cfg_mode: str = "batched"
    guidance_scale: float = 1.0

    @property
    def use_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def separate_cfg(self) -> bool:
        return self.use_cfg and self.cfg_mode == "separate"


# ---- counting real work ------------------------------------------------------------------------


def _last_linear(block: nn.Module) -> nn.Module | None:
    last = None
    for module in block.modules():
        if isinstance(module, nn.Linear):
            last = module
    return last


def _rows(args: tuple, kwargs: dict) -> int:
    x = args[0] if args else next(iter(kwargs.values()), None)
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[-1] > 0:
        return int(x.numel() // x.shape[-1])
    return 1


class WorkCounter:
    """Forward pre-hooks on leaf linears that count the work really executed (see module docstring).

    ``counts()`` -> ``{"attn_calls", "attn_rows", "mlp_calls", "mlp_rows", "n_attention", "n_blocks"}``.
    Only shape metadata is read: no device sync. Usable as a context manager (removes its hooks).
    """

    def __init__(self, transformer: nn.Module, adapter: Any = None) -> None:
        adapter = adapter or get_adapter(transformer)
        self._handles: list[Any] = []
        self._counts = {"attn_calls": 0, "attn_rows": 0, "mlp_calls": 0, "mlp_rows": 0}
        blocks = adapter.blocks(transformer)
        attentions = adapter.attention_modules(transformer)
        self.n_blocks = len(blocks)
        self.n_attention = 0
        for _, block, _ in blocks:
            leaf = _last_linear(block)
            if leaf is not None:
                self._handles.append(leaf.register_forward_pre_hook(self._hook("mlp"), with_kwargs=True))
        for _, attn in attentions:
            to_q = getattr(attn, "to_q", None)
            if isinstance(to_q, nn.Module):
                self.n_attention += 1
                self._handles.append(to_q.register_forward_pre_hook(self._hook("attn"), with_kwargs=True))

    def _hook(self, kind: str) -> Callable[..., None]:
        counts = self._counts

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            counts[f"{kind}_calls"] += 1
            counts[f"{kind}_rows"] += _rows(args, kwargs)

        return pre_hook

    def reset(self) -> None:
        for key in self._counts:
            self._counts[key] = 0

    def counts(self) -> dict[str, int]:
        return {**self._counts, "n_attention": self.n_attention, "n_blocks": self.n_blocks}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "WorkCounter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def count_work(transformer: nn.Module) -> WorkCounter:
    """A :class:`WorkCounter` on ``transformer`` (use ``with count_work(model) as c: ...``)."""
    return WorkCounter(transformer)


def skipped_fraction(counts: dict[str, int] | None, full: dict[str, int] | None, kind: str = "all") -> float | None:
    """``1 - executed / full`` token rows; ``kind`` = ``"all"`` (attention + mlp), ``"attn"`` or ``"mlp"``."""
    if not counts or not full:
        return None
    keys = ("attn_rows", "mlp_rows") if kind == "all" else (f"{kind}_rows",)
    done = sum(counts.get(k, 0) for k in keys)
    total = sum(full.get(k, 0) for k in keys)
    if total <= 0:
        return None
    return 1.0 - done / total


# ---- exact restoration -------------------------------------------------------------------------

_MISSING = object()


class _ModuleSnapshot:
    """Per-module ``__dict__`` keys, instance ``forward``, ``_modules``, ``_parameters``, ``_buffers``.

    :meth:`restore` drops whatever a peer added (instance forwards, ``_diffusers_hook`` registries,
    cache-dit's attributes and patched submodules) and puts back replaced submodules in their
    original order (cache-dit's per-call ``mock.patch`` of the block list moves it to the end of
    ``_modules``, which reorders ``named_modules`` and ``state_dict``). diffspeed's own
    per-model state (``_diffspeed*``: the step context and its pre-hook) is kept.
    """

    def __init__(self, root: nn.Module) -> None:
        self.entries = []
        for module in root.modules():
            self.entries.append((
                module,
                set(module.__dict__),
                module.__dict__.get("forward", _MISSING),
                dict(module._modules),
                dict(module._parameters),
                dict(module._buffers),
            ))

    def restore(self) -> None:
        for module, keys, forward, modules, params, buffers in self.entries:
            for key in list(module.__dict__):
                if key not in keys and not key.startswith("_diffspeed"):
                    del module.__dict__[key]
            if forward is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = forward
            # exact entries *and order* (cache-dit's per-call mock.patch of the block list re-inserts it last)
            for store, saved in ((module._modules, modules), (module._parameters, params), (module._buffers, buffers)):
                if list(store) != list(saved) or any(store[k] is not v for k, v in saved.items()):
                    store.clear()
                    store.update(saved)


# ---- handles -----------------------------------------------------------------------------------

_COUNTERS: "weakref.WeakKeyDictionary[nn.Module, WorkCounter]" = weakref.WeakKeyDictionary()


class PeerHandle:
    """An applied peer. Calling it (or :meth:`remove`) removes the peer; :meth:`stats` gives the counts."""

    def __init__(self, peer: "PeerMethod", transformer: nn.Module, settings: dict[str, Any], run: RunInfo) -> None:
        self.peer = peer
        self.transformer = transformer
        self.settings = settings
        self.run = run
        self.notes: list[str] = []
        self.reported: dict[str, Any] = {}  # what the peer itself says it did, where it says anything
        self.removed = False
        self._undo: list[Callable[[], None]] = []
        self._snapshot = _ModuleSnapshot(transformer)
        self.counter: WorkCounter | None = None

    def on_remove(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def __call__(self) -> None:
        self.remove()

    def remove(self) -> None:
        """Undo the peer (reverse order), then put every module back exactly as before."""
        if self.removed:
            return
        errors = []
        for fn in reversed(self._undo):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - keep undoing; restore below regardless
                errors.append(f"{type(exc).__name__}: {exc}")
        self._undo.clear()
        self._snapshot.restore()
        if self.counter is not None:
            self.counter.remove()
            if _COUNTERS.get(self.transformer) is self.counter:
                del _COUNTERS[self.transformer]
            self.counter = None
        self.removed = True
        if errors:
            raise PeerError(f"removing peer {self.peer.name!r} raised (model restored anyway): {'; '.join(errors)}")

    def stats(self) -> dict[str, Any]:
        """Work counts since apply (or the last ``counter.reset()``) plus the peer's own report."""
        out: dict[str, Any] = dict(self.counter.counts()) if self.counter is not None else {}
        if self.reported:
            out["reported"] = dict(self.reported)
        return out

    def __enter__(self) -> "PeerHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"PeerHandle({self.peer.name!r}, settings={self.settings!r}, removed={self.removed})"


def peer_stats(target: "PeerHandle | nn.Module") -> dict[str, Any]:
    """Counts of a :class:`PeerHandle`, or of the counter of the peer applied to a transformer."""
    if isinstance(target, PeerHandle):
        return target.stats()
    counter = _COUNTERS.get(target)
    return counter.counts() if counter is not None else {}


# ---- the registry ------------------------------------------------------------------------------

ApplyFn = Callable[[nn.Module, dict, RunInfo, PeerHandle], None]


@dataclass
class PeerMethod:
    """One peer: how to apply it, its documented recommended settings and a sweep around them.

    ``apply(transformer, settings=None, run=None, count=True)`` -> :class:`PeerHandle` (callable:
    removes the peer). ``settings`` are merged over ``recommended``. ``calibrate`` (MagCache) runs a
    calibration generation and returns extra settings. Several peers on one model must be removed in
    the reverse order of applying (each handle restores the modules as they were when it applied).
    """

    name: str
    family: str  # "diffusers" | "cache-dit"
    recommended: dict[str, Any]
    sweep: list[dict[str, Any]]
    apply_fn: ApplyFn
    description: str = ""
    source: str = ""  # where the recommended settings come from
    calibrate_fn: Callable[..., dict[str, Any]] | None = None
    reasons_fn: Callable[[nn.Module, dict, RunInfo], list[str]] | None = None

    def settings_for(self, settings: dict[str, Any] | None = None) -> dict[str, Any]:
        return {**copy.deepcopy(self.recommended), **copy.deepcopy(settings or {})}

    def not_supported_reasons(self, transformer: nn.Module, settings: dict[str, Any] | None = None,
                              run: RunInfo | None = None) -> list[str]:
        """Every reason this peer cannot run here (empty when it can)."""
        reasons = []
        module = "cache_dit" if self.family == "cache-dit" else "diffusers.hooks"
        try:
            __import__(module)
        except Exception as exc:  # noqa: BLE001
            reasons.append(f"{module} is not importable ({type(exc).__name__}: {exc})")
            return reasons
        if self.reasons_fn is not None:
            reasons += self.reasons_fn(transformer, self.settings_for(settings), run or RunInfo())
        return reasons

    def apply(self, transformer: nn.Module, settings: dict[str, Any] | None = None, run: RunInfo | None = None,
              count: bool = True) -> PeerHandle:
        run = run or RunInfo()
        merged = self.settings_for(settings)
        reasons = self.not_supported_reasons(transformer, merged, run)
        if reasons:
            raise PeerError(f"{self.name} cannot run here: " + "; ".join(reasons))
        handle = PeerHandle(self, transformer, merged, run)
        try:
            self.apply_fn(transformer, merged, run, handle)
        except Exception as exc:
            try:
                handle.remove()
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
            if isinstance(exc, PeerError):
                raise
            raise PeerError(f"{self.name} failed to apply on {type(transformer).__name__}: {type(exc).__name__}: {exc}") from exc
        if count:
            handle.counter = WorkCounter(transformer)
            _COUNTERS[transformer] = handle.counter
        return handle

    def calibrate(self, loaded: Any, run: RunInfo, labels: Sequence[int], seeds: Sequence[int]) -> dict[str, Any]:
        """Extra settings from a calibration generation (``{}`` for peers that need none)."""
        if self.calibrate_fn is None:
            return {}
        return self.calibrate_fn(self, loaded, run, list(labels), list(seeds))


# ---- diffusers plumbing ------------------------------------------------------------------------


def _diffusers_block_lists(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    """Blocks as diffusers' block caches find them (named children in its identifier list)."""
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

    found = []
    for name, sub in transformer.named_children():
        if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(sub, nn.ModuleList):
            found += [(f"{name}.{i}", b) for i, b in enumerate(sub)]
    return found


def _count_hooks(transformer: nn.Module, names: Sequence[str]) -> int:
    total = 0
    for module in transformer.modules():
        registry = module.__dict__.get("_diffusers_hook")
        if registry is not None:
            total += sum(1 for n in registry.hooks if n in names)
    return total


def _context_setter(transformer: nn.Module) -> Callable[[str | None, Any], None]:
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    try:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context
    except ImportError:  # diffusers <= 0.36: a name only
        def set_old(name: str | None, ctx: Any) -> None:
            registry._set_context(name)

        return set_old

    def set_new(name: str | None, ctx: Any) -> None:
        if name is None:
            _set_cache_context(transformer, None)
            return
        try:
            context = CacheContext(name, step_index=ctx.step_index if ctx.step_index >= 0 else None,
                                   num_inference_steps=ctx.num_steps, timestep=ctx.timestep)
        except TypeError:
            context = CacheContext(name)
        _set_cache_context(transformer, context)

    return set_new


def _install_diffusers_context(transformer: nn.Module, handle: PeerHandle) -> None:
    """Run each forward inside a diffusers cache context named after the CFG branch; reset per generation."""
    from diffusers.hooks import HookRegistry

    ctx = get_context(transformer)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if hasattr(registry, "invalidate_child_registries_cache"):
        registry.invalidate_child_registries_cache()  # hooks were just added below the root
    set_ctx = _context_setter(transformer)
    seen = {"generation": None}

    def wrapper(inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if seen["generation"] != ctx.generation:
            registry.reset_stateful_hooks(recurse=True)
            seen["generation"] = ctx.generation
        set_ctx(ctx.branch, ctx)
        try:
            return inner(*args, **kwargs)
        finally:
            set_ctx(None, ctx)

    handle.on_remove(wrap_forward(transformer, wrapper).remove)


def _register_diffusers_removal(transformer: nn.Module, handle: PeerHandle, names: Sequence[str]) -> None:
    def remove() -> None:
        from diffusers.hooks import HookRegistry

        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        for name in names:
            registry.remove_hook(name, recurse=True)

    handle.on_remove(remove)


def _check_hooked(peer: str, transformer: nn.Module, names: Sequence[str], what: str) -> int:
    n = _count_hooks(transformer, names)
    if n == 0:
        raise PeerError(f"{peer} registered no hook on {type(transformer).__name__} ({what}): it would silently do nothing")
    return n


def _timestep_callback(transformer: nn.Module) -> Callable[[], float]:
    ctx = get_context(transformer)
    return lambda: float(ctx.timestep) if ctx.timestep is not None else 1000.0


def _is_video(transformer: nn.Module) -> bool:
    try:
        return len(get_adapter(transformer).default_latent_shape(transformer)) == 4
    except Exception:  # noqa: BLE001
        return False


def _range(value: Any) -> tuple[float, float]:
    lo, hi = value
    return (lo, hi)


# ---- diffusers peers ---------------------------------------------------------------------------


def _fbc_reasons(transformer: nn.Module, settings: dict, run: RunInfo) -> list[str]:
    n = len(_diffusers_block_lists(transformer))
    return [] if n >= 2 else [f"FirstBlockCache needs a head and a tail block, found {n} block(s)"]


def _apply_fbc(transformer: nn.Module, settings: dict, run: RunInfo, handle: PeerHandle) -> None:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK

    names = (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK)
    _register_diffusers_removal(transformer, handle, names)
    apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold=float(settings["threshold"])))
    _check_hooked("fbc", transformer, names, "no block list found")
    _install_diffusers_context(transformer, handle)


def _apply_pab(transformer: nn.Module, settings: dict, run: RunInfo, handle: PeerHandle) -> None:
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast
    from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK

    kwargs: dict[str, Any] = {"current_timestep_callback": _timestep_callback(transformer)}
    for kind in ("spatial", "temporal", "cross"):
        skip = settings.get(f"{kind}_attention_block_skip_range")
        if skip is not None:
            kwargs[f"{kind}_attention_block_skip_range"] = int(skip)
        rng = settings.get(f"{kind}_attention_timestep_skip_range")
        if rng is not None:
            kwargs[f"{kind}_attention_timestep_skip_range"] = _range(rng)
    names = (_PYRAMID_ATTENTION_BROADCAST_HOOK,)
    _register_diffusers_removal(transformer, handle, names)
    apply_pyramid_attention_broadcast(transformer, PyramidAttentionBroadcastConfig(**kwargs))
    _check_hooked("pab", transformer, names, "no attention module matched its identifiers")
    _install_diffusers_context(transformer, handle)
    if run.separate_cfg:
        handle.notes.append("PAB keeps one cache per attention module for both CFG branches (diffusers' design): "
                            "with separate cond/uncond calls the uncond call can reuse the cond call's attention")


def _fastercache_reasons(transformer: nn.Module, settings: dict, run: RunInfo) -> list[str]:
    if run.separate_cfg:
        return ["FasterCache needs batched CFG (one [uncond, cond] call per step): with separate cond/uncond calls "
                "its denoiser hook splits a single branch in two (use cfg_mode='batched')"]
    return []


def _apply_fastercache(transformer: nn.Module, settings: dict, run: RunInfo, handle: PeerHandle) -> None:
    from diffusers.hooks import FasterCacheConfig, apply_faster_cache
    from diffusers.hooks.faster_cache import (
        _FASTER_CACHE_BLOCK_HOOK,
        _FASTER_CACHE_DENOISER_HOOK,
        _UNCOND_COND_INPUT_KWARGS_IDENTIFIERS,
    )

    weight = float(settings.get("attention_weight", 0.5))
    # DiT passes its condition as class_labels: it is batch-concatenated too
    split_kwargs = tuple(_UNCOND_COND_INPUT_KWARGS_IDENTIFIERS) + ("class_labels",)
    cfg = FasterCacheConfig(
        spatial_attention_block_skip_range=int(settings["spatial_attention_block_skip_range"]),
        spatial_attention_timestep_skip_range=_range(settings["spatial_attention_timestep_skip_range"]),
        low_frequency_weight_update_timestep_range=_range(settings["low_frequency_weight_update_timestep_range"]),
        high_frequency_weight_update_timestep_range=_range(settings["high_frequency_weight_update_timestep_range"]),
        alpha_low_frequency=float(settings.get("alpha_low_frequency", 1.1)),
        alpha_high_frequency=float(settings.get("alpha_high_frequency", 1.1)),
        unconditional_batch_skip_range=int(settings["unconditional_batch_skip_range"]),
        unconditional_batch_timestep_skip_range=_range(settings["unconditional_batch_timestep_skip_range"]),
        attention_weight_callback=lambda _module: weight,
        tensor_format="BCFHW" if _is_video(transformer) else "BCHW",
        is_guidance_distilled=not run.use_cfg,
        current_timestep_callback=_timestep_callback(transformer),
        _unconditional_conditional_input_kwargs_identifiers=list(split_kwargs),
    )
    names = (_FASTER_CACHE_DENOISER_HOOK, _FASTER_CACHE_BLOCK_HOOK)
    _register_diffusers_removal(transformer, handle, names)
    import logging

    logger = logging.getLogger("diffusers.hooks.faster_cache")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its "experimental feature" warning on every apply
    try:
        apply_faster_cache(transformer, cfg)
    finally:
        logger.setLevel(level)
    if _count_hooks(transformer, (_FASTER_CACHE_BLOCK_HOOK,)) == 0 and not run.use_cfg:
        raise PeerError("fastercache hooked no attention module and there is no CFG branch to skip: it would do nothing")
    _check_hooked("fastercache", transformer, names, "nothing matched")
    _install_diffusers_context(transformer, handle)


# a fix for TaylorSeer's default identifiers, which fullmatch no attn1/attn2 module
TAYLORSEER_FIXED_IDENTIFIERS = [r"^(?:transformer_blocks|blocks|single_transformer_blocks|temporal_transformer_blocks)\.\d+\.attn\d*$"]


def _taylorseer_default_matches(transformer: nn.Module) -> list[str]:
    from diffusers.hooks.taylorseer_cache import _TRANSFORMER_BLOCK_IDENTIFIERS

    return [n for n, _ in transformer.named_modules() if any(re.fullmatch(p, n) for p in _TRANSFORMER_BLOCK_IDENTIFIERS)]


def _taylorseer_lite_reasons(transformer: nn.Module, settings: dict, run: RunInfo) -> list[str]:
    if not settings.get("use_lite_mode"):
        return []
    names = {n for n, _ in transformer.named_modules()}
    if "proj_out" not in names:
        return [f"TaylorSeer lite mode forecasts a module named 'proj_out', which {type(transformer).__name__} "
                "lacks (its blocks would return zeros with nothing forecast)"]
    return []


def _dtype(name: Any) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    return getattr(torch, str(name).replace("torch.", ""))


def _apply_taylorseer(transformer: nn.Module, settings: dict, run: RunInfo, handle: PeerHandle) -> None:
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    identifiers = settings.get("cache_identifiers", "auto")
    lite = bool(settings.get("use_lite_mode", False))
    if lite:
        identifiers = None
    elif identifiers == "default":
        identifiers = None
    elif identifiers in (None, "auto"):
        if _taylorseer_default_matches(transformer):
            identifiers = None
        else:
            identifiers = list(TAYLORSEER_FIXED_IDENTIFIERS)
            handle.notes.append(
                f"TaylorSeer's default cache identifiers match no module of {type(transformer).__name__} "
                f"(silent no-op); used cache_identifiers={identifiers}"
            )
            handle.reported["cache_identifiers"] = identifiers
    cfg = TaylorSeerCacheConfig(
        cache_interval=int(settings["cache_interval"]),
        disable_cache_before_step=int(settings["disable_cache_before_step"]),
        disable_cache_after_step=settings.get("disable_cache_after_step"),
        max_order=int(settings["max_order"]),
        taylor_factors_dtype=_dtype(settings.get("taylor_factors_dtype", "bfloat16")),
        cache_identifiers=identifiers,
        use_lite_mode=lite,
    )
    names = (_TAYLORSEER_CACHE_HOOK,)
    _register_diffusers_removal(transformer, handle, names)
    apply_taylorseer_cache(transformer, cfg)
    _check_hooked("taylorseer", transformer, names, "its cache identifiers matched no module")
    _install_diffusers_context(transformer, handle)


def _magcache_reasons(transformer: nn.Module, settings: dict, run: RunInfo) -> list[str]:
    reasons = []
    if not _diffusers_block_lists(transformer):
        reasons.append("MagCache found no transformer block list")
    return reasons


def _apply_magcache(transformer: nn.Module, settings: dict, run: RunInfo, handle: PeerHandle) -> None:
    from diffusers.hooks import MagCacheConfig, apply_mag_cache
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK

    calibrate = bool(settings.get("calibrate", False))
    steps = run.num_steps or settings.get("num_inference_steps")
    if not steps:
        raise PeerError("magcache needs the number of steps (RunInfo.num_steps or settings['num_inference_steps'])")
    ratios = settings.get("mag_ratios")
    if ratios is None and not calibrate:
        raise PeerError("magcache needs mag_ratios calibrated for this model: call PEERS['magcache'].calibrate(loaded, run, "
                        "labels, seeds) first (it runs diffusers' own calibration mode)")
    cfg = MagCacheConfig(
        threshold=float(settings.get("threshold", 0.06)),
        max_skip_steps=int(settings.get("max_skip_steps", 3)),
        retention_ratio=float(settings.get("retention_ratio", 0.2)),
        num_inference_steps=int(steps),
        mag_ratios=None if calibrate else torch.tensor([float(r) for r in ratios]),
        calibrate=calibrate,
    )
    names = (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK)
    _register_diffusers_removal(transformer, handle, names)
    apply_mag_cache(transformer, cfg)
    _check_hooked("magcache", transformer, names, "no block list found")
    _install_diffusers_context(transformer, handle)


def _calibrate_magcache(peer: PeerMethod, loaded: Any, run: RunInfo, labels: list[int], seeds: list[int]) -> dict[str, Any]:
    """Run one generation in diffusers' MagCache calibration mode; returns ``{"mag_ratios": [...]}``.

    diffusers computes, at every step, mean over tokens of ``|r_t| / |r_{t-1}|`` for the block
    stack's residual ``r`` and prints the list at the end of the run (then clears it). The tail
    hook's ``_advance_step`` is wrapped to read the list per CFG branch before it is cleared
    (stdout parsing is the fallback). With separate cond/uncond calls the per-branch lists are
    averaged (diffusers' MagCacheConfig holds one list for both branches).
    """
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK

    from ..sampler import generate

    if not run.num_steps:
        raise PeerError("magcache calibration needs RunInfo.num_steps")
    transformer = loaded.transformer
    ctx = get_context(transformer)
    captured: dict[str, list[float]] = {}
    handle = peer.apply(transformer, {"calibrate": True}, run, count=False)
    try:
        blocks = _diffusers_block_lists(transformer)
        tail = blocks[-1][1]
        hook = HookRegistry.check_if_exists_or_initialize(tail).get_hook(_MAG_CACHE_BLOCK_HOOK)
        original = getattr(hook, "_advance_step", None)
        if original is not None:
            def advance(state: Any) -> None:
                if state.step_index + 1 >= hook.config.num_inference_steps:
                    captured[ctx.branch] = [float(r) for r in state.calibration_ratios]
                original(state)

            hook._advance_step = advance
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            generate(loaded, labels, seeds, num_steps=run.num_steps, guidance_scale=run.guidance_scale,
                     cfg_mode=run.cfg_mode)
        if not captured:
            import ast

            lines = out.getvalue().splitlines()
            lists = [ast.literal_eval(line.strip()) for line in lines if line.strip().startswith("[")]
            for i, values in enumerate(lists):
                captured[f"printed{i}"] = [float(v) for v in values]
    finally:
        handle.remove()
    if not captured:
        raise PeerError("magcache calibration produced no ratios")
    lists = [v for v in captured.values() if len(v) == run.num_steps] or list(captured.values())
    n = min(len(v) for v in lists)
    ratios = [sum(v[i] for v in lists) / len(lists) for i in range(n)]
    if not all(math.isfinite(r) for r in ratios):
        raise PeerError(f"magcache calibration gave non-finite ratios: {ratios}")
    return {"mag_ratios": [round(r, 6) for r in ratios]}


# ---- cache-dit peers ---------------------------------------------------------------------------

DBCACHE_KEYS = ("Fn_compute_blocks", "Bn_compute_blocks", "residual_diff_threshold", "max_warmup_steps",
                "warmup_interval", "max_cached_steps", "max_continuous_cached_steps",
                "max_accumulated_residual_diff_threshold")


def _n_blocks(transformer: nn.Module) -> int:
    try:
        return len(get_adapter(transformer).blocks(transformer))
    except Exception:  # noqa: BLE001
        return len(_diffusers_block_lists(transformer))


def _dbcache_reasons(transformer: nn.Module, settings: dict, run: RunInfo) -> list[str]:
    reasons = []
    try:
        from cache_dit.caching.block_adapters import BlockAdapterRegister

        if not BlockAdapterRegister.is_supported(transformer):
            reasons.append(f"cache-dit has no registered BlockAdapter for {type(transformer).__name__}")
    except Exception as exc:  # noqa: BLE001
        reasons.append(f"cache-dit's adapter registry failed: {type(exc).__name__}: {exc}")
    n = _n_blocks(transformer)
    fn, bn = int(settings.get("Fn_compute_blocks", 8)), int(settings.get("Bn_compute_blocks", 0))
    if fn + bn >= n:
        reasons.append(f"DBCache F{fn}B{bn} leaves no middle block to cache in a {n}-block model "
                       f"(needs Fn + Bn < {n}; cache-dit's default F8B0 needs at least 9 blocks)")
    return reasons


def _dbcache_configs(settings: dict, run: RunInfo, num_steps: int | None) -> tuple[Any, Any]:
    from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

    kwargs = {k: settings[k] for k in DBCACHE_KEYS if k in settings}
    cache_config = DBCacheConfig(**kwargs, enable_separate_cfg=run.separate_cfg, cfg_compute_first=False,
                                 num_inference_steps=num_steps)
    order = int(settings.get("taylorseer_order", 0) or 0)
    calibrator = TaylorSeerCalibratorConfig(taylorseer_order=order) if order > 0 else None
    return cache_config, calibrator


def _apply_dbcache(transformer: nn.Module, settings: dict, run: RunInfo, handle: PeerHandle) -> None:
    import cache_dit

    _silence_cache_dit()
    ctx = get_context(transformer)
    cache_config, calibrator = _dbcache_configs(settings, run, run.num_steps)
    handle.on_remove(lambda: _quiet(cache_dit.disable_cache, transformer))
    _quiet(cache_dit.enable_cache, transformer, cache_config=cache_config, calibrator_config=calibrator)
    if not getattr(transformer, "_is_cached", False):
        raise PeerError("cache_dit.enable_cache did not mark the transformer as cached")
    seen = {"generation": None}

    def wrapper(inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if seen["generation"] != ctx.generation:
            # transformer-only cache-dit keeps one persistent context: start each generation afresh
            steps = ctx.num_steps or run.num_steps
            cc, cal = _dbcache_configs(settings, run, steps)
            _quiet(cache_dit.refresh_context, transformer, cache_config=cc, calibrator_config=cal)
            seen["generation"] = ctx.generation
        return inner(*args, **kwargs)

    handle.on_remove(wrap_forward(transformer, wrapper).remove)
    handle.on_remove(lambda: handle.reported.update(_dbcache_report(transformer)))
    if run.use_cfg:
        handle.notes.append(f"cache-dit enable_separate_cfg={run.separate_cfg} (cfg_mode={run.cfg_mode!r})")


def _dbcache_report(transformer: nn.Module) -> dict[str, Any]:
    try:
        manager = transformer._context_manager
        out = {}
        for name in getattr(transformer, "_context_names", []) or []:
            c = manager.get_context(name)
            out[name] = {"cached_steps": len(c.get_cached_steps()), "cfg_cached_steps": len(c.get_cfg_cached_steps())}
        return {"last_generation": out}
    except Exception:  # noqa: BLE001 - a report is a nicety
        return {}


def _silence_cache_dit() -> None:
    """cache-dit logs every enable/refresh/disable at info/warning level to stdout: keep errors only."""
    import logging

    for name in list(logging.Logger.manager.loggerDict):
        if name.lower().startswith("cache_dit"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _quiet(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a cache-dit function without its console chatter (stdout/stderr prints and info logs)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, **kwargs)


# ---- the registry ------------------------------------------------------------------------------

_FBC_SOURCE = "diffusers FirstBlockCacheConfig default threshold 0.05 (docs example uses 0.2 on CogView4)"
_DBCACHE_RECOMMENDED = {
    "Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.12, "max_warmup_steps": 8,
    "warmup_interval": 1, "max_cached_steps": -1, "max_continuous_cached_steps": 3,
}
_DBCACHE_SWEEP = (
    [{"residual_diff_threshold": t} for t in (0.04, 0.08, 0.2, 0.3, 0.5)]
    + [{"residual_diff_threshold": t, "max_warmup_steps": 2} for t in (0.08, 0.12, 0.2, 0.3)]
)
_WIDE = [-1, 1001]  # every timestep of a 1000-scale schedule

PEERS: dict[str, PeerMethod] = {
    "fbc": PeerMethod(
        "fbc", "diffusers", {"threshold": 0.05},
        [{"threshold": t} for t in (0.02, 0.08, 0.12, 0.2, 0.3, 0.4, 0.6)],
        _apply_fbc, "diffusers FirstBlockCache", _FBC_SOURCE, reasons_fn=_fbc_reasons,
    ),
    "pab": PeerMethod(
        "pab", "diffusers",
        {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": [100, 800]},
        [
            {"spatial_attention_block_skip_range": 3},
            {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": _WIDE},
            {"spatial_attention_block_skip_range": 4, "spatial_attention_timestep_skip_range": _WIDE},
            {"cross_attention_block_skip_range": 6, "cross_attention_timestep_skip_range": [100, 800]},
        ],
        _apply_pab, "diffusers PyramidAttentionBroadcast",
        "diffusers docs example (CogVideoX): spatial skip range 2, timesteps (100, 800); cross 6 from the PAB paper",
    ),
    "fastercache": PeerMethod(
        "fastercache", "diffusers",
        {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": [-1, 681],
         "low_frequency_weight_update_timestep_range": [99, 641],
         "high_frequency_weight_update_timestep_range": [-1, 301], "attention_weight": 0.3,
         "unconditional_batch_skip_range": 5, "unconditional_batch_timestep_skip_range": [-1, 641]},
        [
            {"spatial_attention_block_skip_range": 3},
            {"unconditional_batch_skip_range": 3},
            {"spatial_attention_block_skip_range": 3, "unconditional_batch_skip_range": 8,
             "spatial_attention_timestep_skip_range": [-1, 901], "unconditional_batch_timestep_skip_range": [-1, 901]},
        ],
        _apply_fastercache, "diffusers FasterCache (attention reuse + CFG-cache)",
        "diffusers apply_faster_cache docs example (CogVideoX), other values the FasterCacheConfig defaults",
        reasons_fn=_fastercache_reasons,
    ),
    "taylorseer": PeerMethod(
        "taylorseer", "diffusers",
        {"cache_interval": 5, "disable_cache_before_step": 3, "max_order": 1, "taylor_factors_dtype": "float32",
         "cache_identifiers": "auto"},
        [{"cache_interval": n} for n in (2, 3, 4, 6, 8)] + [{"cache_interval": n, "max_order": 2} for n in (3, 5)],
        _apply_taylorseer, "diffusers TaylorSeerCache on attention outputs",
        "diffusers apply_taylorseer_cache docs example (FLUX): interval 5, order 1, 3 warm-up steps, float32",
        reasons_fn=_taylorseer_lite_reasons,
    ),
    "taylorseer_lite": PeerMethod(
        "taylorseer_lite", "diffusers",
        {"cache_interval": 5, "disable_cache_before_step": 3, "max_order": 1, "taylor_factors_dtype": "float32",
         "use_lite_mode": True},
        [{"cache_interval": n} for n in (2, 3, 4, 6)],
        _apply_taylorseer, "diffusers TaylorSeerCache lite mode (blocks skipped, proj_out forecast)",
        "as taylorseer, use_lite_mode=True",
        reasons_fn=_taylorseer_lite_reasons,
    ),
    "magcache": PeerMethod(
        "magcache", "diffusers", {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2},
        [{"threshold": t} for t in (0.02, 0.12, 0.24, 0.5)]
        + [{"threshold": t, "max_skip_steps": k}
           for t, k in ((0.24, 5), (0.12, 4), (0.24, 4), (0.12, 5), (0.12, 6), (0.24, 6))],
        _apply_magcache, "diffusers MagCache with mag_ratios from its own calibration mode",
        "diffusers MagCacheConfig defaults (threshold 0.06, K=3, retention 0.2)",
        calibrate_fn=_calibrate_magcache, reasons_fn=_magcache_reasons,
    ),
    "dbcache": PeerMethod(
        "dbcache", "cache-dit", dict(_DBCACHE_RECOMMENDED), copy.deepcopy(_DBCACHE_SWEEP),
        _apply_dbcache, "cache-dit DBCache F1B0",
        "cache-dit example CLI defaults: --Fn 1 --Bn 0 --rdt 0.12 --ws 8 --mcc 3",
        reasons_fn=_dbcache_reasons,
    ),
    "dbcache_taylorseer": PeerMethod(
        "dbcache_taylorseer", "cache-dit", {**_DBCACHE_RECOMMENDED, "taylorseer_order": 1},
        copy.deepcopy(_DBCACHE_SWEEP) + [{"residual_diff_threshold": 0.12, "taylorseer_order": 2}],
        _apply_dbcache, "cache-dit DBCache F1B0 + TaylorSeer calibrator",
        "cache-dit example CLI defaults with --taylorseer --taylorseer-order 1",
        reasons_fn=_dbcache_reasons,
    ),
}


def peer_names() -> list[str]:
    return list(PEERS)


def get_peer(name: str) -> PeerMethod:
    try:
        return PEERS[name]
    except KeyError:
        raise PeerError(f"unknown peer {name!r}; known: {', '.join(PEERS)}") from None


def apply_peer(name: str, transformer: nn.Module, settings: dict[str, Any] | None = None,
               run: RunInfo | None = None, count: bool = True) -> PeerHandle:
    """``get_peer(name).apply(transformer, settings, run)``."""
    return get_peer(name).apply(transformer, settings, run, count=count)


@contextlib.contextmanager
def applied(name: str, transformer: nn.Module, settings: dict[str, Any] | None = None,
            run: RunInfo | None = None) -> Iterator[PeerHandle]:
    handle = apply_peer(name, transformer, settings, run)
    try:
        yield handle
    finally:
        handle.remove()


def settings_jsonable(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as plain JSON values (tuples -> lists, dtypes -> names)."""
    out = {}
    for key, value in settings.items():
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, torch.dtype):
            value = str(value).replace("torch.", "")
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        out[key] = value
    return out

