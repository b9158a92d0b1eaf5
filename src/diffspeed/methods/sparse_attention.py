"""S2O-style block-sparse self-attention (importance-ordered block loading with early stop).

The attention math lives in :mod:`diffspeed.kernels.sparse_attn`; this method routes the
self-attention of each attention module of the model to it and leaves everything else dense.

**How the routing works.** Each attention module's processor is left in place. The module's
``forward`` is wrapped (:func:`diffspeed.hooks.wrap_forward`); during the wrapped call, the one
global name the processor's ``__call__`` uses for its attention op is swapped, in the processor's
own Python module, for a router:

* processors that call ``dispatch_attention_fn`` (diffusers' attention dispatcher: Wan, Flux, and
  every processor written for ``AttentionModuleMixin``) get a router with the same signature;
  tensors are ``(B, N, H, D)`` there;
* processors that call ``F.scaled_dot_product_attention`` (``AttnProcessor2_0``: DiT, PixArt,
  SD3's ``JointAttnProcessor2_0``, CogVideoX) get a proxy in place of the module global ``F`` whose
  ``scaled_dot_product_attention`` is the router; tensors are ``(B, H, N, D)``.

The swap is reference-counted per (module, name): the first entry installs it, the last exit
restores the exact original object, so nesting and several models sharing a processor module are
safe. The router reads the active config from a :class:`contextvars.ContextVar` set by the wrapped
forward; a call outside any wrapped module (or in another thread) goes to the original function
with the original arguments. A call is sparsified only if it is self-attention (``N_q == N_k``)
with at least ``min_tokens`` keys, no mask, no dropout, not causal and no context parallelism;
anything else (cross-attention, short sequences) calls the original op unchanged and counts as
dense. ``remove()`` unwraps every forward: outputs are then bit-identical.

Stats: ``attention_calls_sparse``, ``attention_calls_dense``, ``mean_density`` (mean over sparse
calls of the fraction of (query block, key block) pairs computed). Reading the density is a host
sync per sparse call.
"""

from __future__ import annotations

import contextvars
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.base import ModelAdapter
from ..errors import DiffspeedError, UnsupportedModelError
from ..hooks import wrap_forward
from ..kernels.sparse_attn import block_sparse_attention, flex_available, flex_block_sparse_attention
from .base import MethodConfig, MethodHandle, Stage, register_method

_BACKENDS = ("auto", "reference", "flex")


@dataclass(frozen=True)
class SparseAttentionConfig(MethodConfig):
    """Block-sparse self-attention with importance-ordered blocks and early stop.

    block_size: tokens per query/key block (128 suits the GPU flex kernel).
    threshold: estimated attention mass allowed to be skipped per query block (0 = exact).
    local_window: key blocks within this distance of the query block are always computed.
    global_tokens: the first tokens of the sequence (e.g. Flux's text tokens) are always attended.
    backend: "auto" (flex on CUDA, else reference), "reference" (PyTorch, any device) or "flex".
    min_tokens: only self-attention with at least this many keys is sparsified.
    compensate: opt-in remainder compensation (default False). The S2O stop rule already estimates
        the attention mass of the key blocks it skips; instead of dropping that mass, add its pooled
        estimate: each skipped key block contributes ``n_j * exp(scale * q . mean_k_j)`` (times
        ``mean_v_j`` in the numerator) per query token, merged exactly with the computed blocks.
        Exact when a block's keys are equal, an approximation when they are spread; costs
        ``N x N / block_size`` extra scores. ``threshold=0`` is unaffected (nothing is skipped).
    """

    method: ClassVar[str] = "sparse_attention"
    stage: ClassVar[Stage] = Stage.ATTENTION
    incompatible: ClassVar[dict[str, str]] = {}
    compile_note: ClassVar[str] = (
        "the routing swaps a module global during the attention forward and the reference path stops "
        "early on a host-side check: use backend='flex' and compile the flex kernel, not the routing"
    )

    block_size: int = 128
    threshold: float = 0.02
    local_window: int = 0
    global_tokens: int = 0
    backend: str = "auto"
    min_tokens: int = 1024
    compensate: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise DiffspeedError(f"sparse_attention block_size must be an int > 0 (e.g. 64), got {self.block_size!r}")
        if not (isinstance(self.threshold, (int, float)) and self.threshold >= 0):
            raise DiffspeedError(
                f"sparse_attention threshold must be >= 0 (0 = exact, e.g. 0.02), got {self.threshold!r}"
            )
        if not self.threshold < 1:
            raise DiffspeedError(
                f"sparse_attention threshold must be < 1 (it is a share of the attention mass), got {self.threshold}"
            )
        if not isinstance(self.local_window, int) or self.local_window < 0:
            raise DiffspeedError(f"sparse_attention local_window must be an int >= 0 (blocks), got {self.local_window!r}")
        if not isinstance(self.global_tokens, int) or self.global_tokens < 0:
            raise DiffspeedError(
                f"sparse_attention global_tokens must be an int >= 0 (tokens), got {self.global_tokens!r}"
            )
        if self.backend not in _BACKENDS:
            raise DiffspeedError(
                f"sparse_attention backend must be one of {', '.join(_BACKENDS)}, got {self.backend!r}"
            )
        if not isinstance(self.min_tokens, int) or self.min_tokens < 1:
            raise DiffspeedError(f"sparse_attention min_tokens must be an int >= 1, got {self.min_tokens!r}")
        if not isinstance(self.compensate, bool):
            raise DiffspeedError(
                f"sparse_attention compensate must be a bool (True / False), got {self.compensate!r}"
            )


FLEX_CUDA_BLOCK = 128  # the flex kernel's query/key tile on CUDA; block sizes must be multiples of it

# ---- the active routing target -------------------------------------------------------------------

# (config, stats) of the innermost wrapped attention module being run, or None
_ACTIVE: contextvars.ContextVar[tuple[SparseAttentionConfig, dict[str, float]] | None] = contextvars.ContextVar(
    "diffspeed_sparse_attention", default=None
)


def _sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
            cfg: SparseAttentionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, N, D) -> (out, density)."""
    use_flex = cfg.backend == "flex" or (cfg.backend == "auto" and q.is_cuda and flex_available())
    if use_flex and q.is_cuda and cfg.block_size % FLEX_CUDA_BLOCK:
        raise DiffspeedError(
            f"sparse_attention block_size {cfg.block_size} does not suit the CUDA flex kernel, which tiles "
            f"queries and keys by {FLEX_CUDA_BLOCK} (measured on an H100, torch 2.11: 64 fails); use block_size="
            f"{FLEX_CUDA_BLOCK} or a multiple, or backend='reference'"
        )
    fn = flex_block_sparse_attention if use_flex else block_sparse_attention
    return fn(q, k, v, block_size=cfg.block_size, threshold=cfg.threshold, local_window=cfg.local_window,
              global_tokens=cfg.global_tokens, scale=scale, return_density=True, compensate=cfg.compensate)


def _eligible(cfg: SparseAttentionConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_dim: int,
              attn_mask: Any, dropout_p: float, is_causal: bool) -> bool:
    return (
        attn_mask is None
        and not dropout_p
        and not is_causal
        and q.dim() == 4
        and q.shape == k.shape
        and k.shape[:3] == v.shape[:3]
        and k.shape[seq_dim] >= cfg.min_tokens
    )


def _record(stats: dict[str, float], density: torch.Tensor | None) -> None:
    if density is None:
        stats["attention_calls_dense"] += 1
        return
    stats["attention_calls_sparse"] += 1
    n = stats["attention_calls_sparse"]
    stats["mean_density"] += (float(density) - stats["mean_density"]) / n


def _make_sdpa_router(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def dense(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, kwargs):
        # torch's SDPA takes scale / enable_gqa as keywords only (6 positional arguments at most)
        if enable_gqa:
            kwargs = {**kwargs, "enable_gqa": True}
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False,
             **kwargs):
        active = _ACTIVE.get()
        if active is None:
            return dense(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, kwargs)
        cfg, stats = active
        if kwargs or enable_gqa or not _eligible(cfg, query, key, value, 2, attn_mask, dropout_p, is_causal):
            _record(stats, None)
            return dense(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, kwargs)
        out, density = _sparse(query, key, value, scale, cfg)
        _record(stats, density)
        return out

    return sdpa


def _make_dispatch_router(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                              enable_gqa=False, attention_kwargs=None, **kw):
        call = lambda: original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,  # noqa: E731
                                attention_kwargs, **kw)
        active = _ACTIVE.get()
        if active is None:
            return call()
        cfg, stats = active
        if (enable_gqa or attention_kwargs or kw.get("parallel_config") is not None
                or not _eligible(cfg, query, key, value, 1, attn_mask, dropout_p, is_causal)):
            _record(stats, None)
            return call()
        # dispatcher layout is (B, N, H, D)
        out, density = _sparse(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale, cfg)
        _record(stats, density)
        return out.transpose(1, 2)

    return dispatch_attention_fn


class _FProxy:
    """Stands in for ``torch.nn.functional`` in a processor module: only SDPA is rerouted."""

    def __init__(self, functional: Any, sdpa: Callable[..., torch.Tensor]) -> None:
        self._functional = functional
        self.scaled_dot_product_attention = sdpa

    def __getattr__(self, name: str) -> Any:
        return getattr(self._functional, name)


# ---- reference-counted swap of a processor module's global ---------------------------------------

_LOCK = threading.Lock()
_SWAPS: dict[tuple[str, str], list[Any]] = {}  # (module name, global) -> [original, depth]


def _make_replacement(kind: str, original: Any) -> Any:
    if kind == "dispatch":
        return _make_dispatch_router(original)
    return _FProxy(original, _make_sdpa_router(original.scaled_dot_product_attention))


class _Swap:
    def __init__(self, module_name: str, name: str, kind: str) -> None:
        self.key = (module_name, name)
        self.kind = kind

    def __enter__(self) -> None:
        with _LOCK:
            entry = _SWAPS.get(self.key)
            if entry is None:
                mod = sys.modules[self.key[0]]
                original = mod.__dict__[self.key[1]]
                entry = _SWAPS[self.key] = [original, 0]
                mod.__dict__[self.key[1]] = _make_replacement(self.kind, original)
            entry[1] += 1

    def __exit__(self, *exc: object) -> None:
        with _LOCK:
            entry = _SWAPS[self.key]
            entry[1] -= 1
            if entry[1] == 0:
                sys.modules[self.key[0]].__dict__[self.key[1]] = entry[0]
                del _SWAPS[self.key]


def _route_kind(processor: Any) -> tuple[str, str, str] | str:
    """(module name, global name, kind) for a supported processor, else the reason it is not."""
    cls = type(processor)
    call = getattr(cls, "__call__", None)
    code = getattr(call, "__code__", None)
    mod = sys.modules.get(cls.__module__)
    if code is None or mod is None:
        return f"processor {cls.__name__} has no Python __call__ to route"
    names = code.co_names
    if "dispatch_attention_fn" in names and callable(mod.__dict__.get("dispatch_attention_fn")):
        return cls.__module__, "dispatch_attention_fn", "dispatch"
    if "scaled_dot_product_attention" in names and "F" in names and mod.__dict__.get("F") is F:
        return cls.__module__, "F", "sdpa"
    return (f"processor {cls.__name__} calls neither diffusers' dispatch_attention_fn nor "
            "F.scaled_dot_product_attention (custom or xformers/sliced processors are not supported)")


@register_method(SparseAttentionConfig)
def apply_sparse_attention(model: nn.Module, config: SparseAttentionConfig, adapter: ModelAdapter) -> MethodHandle:
    if config.backend == "flex" and not flex_available():
        raise DiffspeedError(
            f"sparse_attention backend='flex' needs torch.nn.attention.flex_attention (torch {torch.__version__} "
            "lacks it); use backend='reference' or 'auto'"
        )
    handle = MethodHandle(model, config)
    stats = handle.stats
    stats.update({"attention_calls_sparse": 0, "attention_calls_dense": 0, "mean_density": 0.0})
    targets: list[tuple[nn.Module, tuple[str, str, str]]] = []
    reasons: list[str] = []
    for fqn, module in adapter.attention_modules(model):
        processor = getattr(module, "processor", None)
        if processor is None:
            reasons.append(f"{fqn}: no `processor` attribute")
            continue
        if getattr(module, "is_cross_attention", False):
            continue  # cross-attention stays dense: nothing to route
        route = _route_kind(processor)
        if isinstance(route, str):
            reasons.append(f"{fqn}: {route}")
        else:
            targets.append((module, route))
    if not targets:
        raise UnsupportedModelError(
            f"sparse_attention cannot run on {type(model).__name__}: no supported self-attention module; "
            + ("; ".join(reasons) if reasons else "the adapter lists no attention modules")
        )

    def make_wrapper(route: tuple[str, str, str]) -> Callable[..., Any]:
        swap = _Swap(*route)

        def wrapper(inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            token = _ACTIVE.set((config, stats))
            try:
                with swap:
                    return inner(*args, **kwargs)
            finally:
                _ACTIVE.reset(token)

        return wrapper

    for module, route in targets:
        handle.on_remove(wrap_forward(module, make_wrapper(route)).remove)
    stats["attention_modules_routed"] = len(targets)
    return handle
