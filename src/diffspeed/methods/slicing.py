"""Feature slicing + operator grouping (Streamlined Inference): lower peak activation memory, same output.

Idea: the largest activations inside a transformer block are (a) the feed-forward's hidden layer,
``tokens x 4*dim``, and (b) the attention score matrix, ``heads x tokens x tokens`` (materialised by
the math SDPA backend and by many fallback kernels). Both are computed by operators that are
independent across query tokens, so they can run over chunks of tokens and be concatenated:

* **feed-forward slicing** (operator grouping): each block's feed-forward module (diffusers
  ``FeedForward``: ``ff`` / ``ff_context`` in DiT, PixArt, SD3, Flux double blocks and CogVideoX,
  ``ffn`` in Wan) is wrapped so its whole chain (proj-in, activation, dropout, proj-out) runs on
  ``chunk_tokens`` tokens at a time; only one chunk's ``4*dim`` hidden layer is alive at once. Exact:
  every operator in it is token-wise, so each output row is computed by the same kernels on the
  same row (bit-identical on the backends we tested; at worst float rounding of a different GEMM tiling).
* **attention query chunking**: in each self-attention module, the SDPA call is routed to a loop over
  ``attention_query_chunk`` queries against the full keys/values. Softmax is per query row, so this
  is exact up to float rounding. The routing is done by wrapping the attention module's ``forward``
  and, only while it runs, swapping the names the processor calls through (``F`` for processors that
  call ``F.scaled_dot_product_attention`` - AttnProcessor2_0, JointAttnProcessor2_0,
  CogVideoXAttnProcessor2_0 - and ``dispatch_attention_fn`` for the Wan / Flux processors) in the
  processor's own module globals. The swap is reference-counted (re-entrant) and restored exactly on
  exit, even on error; calls that cannot be chunked safely (causal, dropout, context parallel, a
  mask whose query axis cannot be sliced) are passed through unchanged.

Not sliced (stated in ``handle.notes``): Flux single-stream blocks fuse the MLP (``proj_mlp`` ->
``act_mlp``) with attention: the MLP hidden layer is concatenated with the attention output before
the shared ``proj_out``, so the full-size tensor is materialised regardless and slicing it would need
a rewrite of the block's forward. Their attention is still query-chunked. Cross-attention modules
(PixArt / Wan ``attn2``) are left alone: their key length is the short text sequence, so their score
matrix is small.

Caveat: the swap of module globals is process-wide for the duration of one attention forward; do not
run the same diffusers processor module from another Python thread concurrently.

VAE: the VAE is not part of the transformer this method is applied to. For user pipelines,
:func:`enable_vae_memory_savers` turns on diffusers' ``enable_slicing`` / ``enable_tiling`` and
returns an undo function; ``vae=True`` in the config documents the intent for recipes that drive a
pipeline (the transformer handler ignores it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as _F
from torch import nn

from ..adapters.base import ModelAdapter
from ..errors import DiffspeedError
from ..hooks import wrap_forward
from .base import MethodConfig, MethodHandle, Stage, register_method

FF_NAMES = ("ff", "ff_context", "ffn")


@dataclass(frozen=True)
class SlicingConfig(MethodConfig):
    """Run token-wise operators and attention over token chunks to lower peak activation memory.

    chunk_tokens: tokens per chunk for the feed-forward modules (smaller = less memory, more launches).
    attention_query_chunk: queries per chunk for self-attention (0 = no attention chunking).
    vae: for pipelines, also enable diffusers VAE slicing/tiling via :func:`enable_vae_memory_savers`
        (the transformer handler does not touch the VAE).
    """

    method: ClassVar[str] = "slicing"
    stage: ClassVar[Stage] = Stage.TOKENS
    incompatible: ClassVar[dict[str, str]] = {}
    compile_note: ClassVar[str] = (
        "the chunk loops are plain Python over static shapes and trace fine, but the attention routing "
        "swaps module globals at call time: apply slicing before compile so the traced graph sees it"
    )

    chunk_tokens: int = 1024
    attention_query_chunk: int = 1024
    vae: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.chunk_tokens, bool) or not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1:
            raise DiffspeedError(
                f"slicing chunk_tokens must be a positive integer (e.g. 1024; larger = faster, more memory), "
                f"got {self.chunk_tokens!r}"
            )
        if (
            isinstance(self.attention_query_chunk, bool)
            or not isinstance(self.attention_query_chunk, int)
            or self.attention_query_chunk < 0
        ):
            raise DiffspeedError(
                "slicing attention_query_chunk must be a positive integer (e.g. 1024) or 0 to turn attention "
                f"chunking off, got {self.attention_query_chunk!r}"
            )
        if not isinstance(self.vae, bool):
            raise DiffspeedError(f"slicing vae must be true or false, got {self.vae!r}")


# ---- feed-forward slicing ----------------------------------------------------------------------


def _sliced_ff(chunk: int, stats: dict[str, float]) -> Callable[..., Any]:
    def wrapper(inner: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() < 3 or hidden_states.shape[-2] <= chunk:
            return inner(hidden_states, *args, **kwargs)
        stats["ff_calls_sliced"] += 1
        parts = [inner(h, *args, **kwargs) for h in hidden_states.split(chunk, dim=-2)]
        return torch.cat(parts, dim=-2)

    return wrapper


# ---- attention query chunking ------------------------------------------------------------------


def _slice_mask(mask: Any, n_q: int, start: int, stop: int) -> tuple[bool, Any]:
    """(ok, mask sliced to queries [start, stop)); masks broadcast along queries pass whole."""
    if mask is None or not isinstance(mask, torch.Tensor) or mask.dim() < 2:
        return True, mask
    if mask.shape[-2] == 1:
        return True, mask
    if mask.shape[-2] == n_q:
        return True, mask[..., start:stop, :]
    return False, mask


def _chunked_call(
    fn: Callable[..., torch.Tensor], q_dim: int, chunk: int, stats: dict[str, float],
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, args: tuple, kwargs: dict,
) -> torch.Tensor:
    """Call ``fn(query, key, value, *args, **kwargs)`` over query chunks along ``q_dim`` if it is safe.

    ``args`` follow the SDPA order (attn_mask, dropout_p, is_causal, ...), which both
    ``F.scaled_dot_product_attention`` and ``dispatch_attention_fn`` share.
    """
    n_q = query.shape[q_dim]
    mask = args[0] if len(args) > 0 else kwargs.get("attn_mask")
    dropout = args[1] if len(args) > 1 else kwargs.get("dropout_p", 0.0)
    causal = args[2] if len(args) > 2 else kwargs.get("is_causal", False)
    if (
        n_q <= chunk
        or causal
        or dropout
        or kwargs.get("parallel_config") is not None
        or not (isinstance(mask, torch.Tensor) or mask is None)
    ):
        return fn(query, key, value, *args, **kwargs)
    pieces = []
    for start in range(0, n_q, chunk):
        stop = min(start + chunk, n_q)
        ok, m = _slice_mask(mask, n_q, start, stop)
        if not ok:
            return fn(query, key, value, *args, **kwargs)
        if len(args) > 0:
            a, k = (m,) + tuple(args[1:]), kwargs
        else:
            a, k = args, ({**kwargs, "attn_mask": m} if "attn_mask" in kwargs else kwargs)
        pieces.append(fn(query.narrow(q_dim, start, stop - start), key, value, *a, **k))
    stats["attn_calls_sliced"] += 1
    return torch.cat(pieces, dim=q_dim)


class _FProxy:
    """Stands in for ``torch.nn.functional`` in a processor module: only SDPA is replaced."""

    def __init__(self, sdpa: Callable[..., torch.Tensor]) -> None:
        self.scaled_dot_product_attention = sdpa

    def __getattr__(self, name: str) -> Any:
        return getattr(_F, name)


class _GlobalsRouter:
    """Reference-counted swap of ``F`` / ``dispatch_attention_fn`` in one module's globals."""

    _by_module: dict[int, "_GlobalsRouter"] = {}

    def __init__(self, g: dict[str, Any]) -> None:
        self.g = g
        self.depth = 0
        self.saved: dict[str, Any] = {}
        # the chunk size and stats of the innermost active attention forward
        self.active: list[tuple[int, dict[str, float]]] = []

    @classmethod
    def for_globals(cls, g: dict[str, Any]) -> "_GlobalsRouter":
        router = cls._by_module.get(id(g))
        if router is None or router.g is not g:
            router = cls._by_module[id(g)] = cls(g)
        return router

    def routable(self) -> bool:
        return self.g.get("F") is _F or "dispatch_attention_fn" in self.g

    def enter(self, chunk: int, stats: dict[str, float]) -> None:
        self.active.append((chunk, stats))
        self.depth += 1
        if self.depth > 1:
            return
        g = self.g
        if g.get("F") is _F:
            self.saved["F"] = _F
            real_sdpa = _F.scaled_dot_product_attention

            def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
                c, st = self.active[-1]
                return _chunked_call(real_sdpa, -2, c, st, query, key, value, args, kwargs)  # (B, H, S, D)

            g["F"] = _FProxy(sdpa)
        if "dispatch_attention_fn" in g:
            real_dispatch = g["dispatch_attention_fn"]
            self.saved["dispatch_attention_fn"] = real_dispatch

            def dispatch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
                c, st = self.active[-1]
                return _chunked_call(real_dispatch, 1, c, st, query, key, value, args, kwargs)  # (B, S, H, D)

            g["dispatch_attention_fn"] = dispatch

    def exit(self) -> None:
        self.active.pop()
        self.depth -= 1
        if self.depth == 0:
            for name, value in self.saved.items():
                self.g[name] = value
            self.saved.clear()


def _processor_globals(attn: nn.Module) -> dict[str, Any] | None:
    proc = getattr(attn, "processor", None)
    call = getattr(type(proc), "__call__", None) if proc is not None else None
    return getattr(call, "__globals__", None)


def _is_self_attention(attn: nn.Module) -> bool:
    if getattr(attn, "is_cross_attention", False):
        return False
    # Wan's attn2 / PixArt's attn2 take text as keys; diffusers marks them is_cross_attention
    return True


def _chunked_attention(chunk: int, stats: dict[str, float]) -> Callable[..., Any]:
    def wrapper(inner: Any, *args: Any, **kwargs: Any) -> Any:
        g = _processor_globals(wrapper.module)  # processor may be swapped after apply: look it up per call
        if g is None:
            return inner(*args, **kwargs)
        router = _GlobalsRouter.for_globals(g)
        if not router.routable():
            return inner(*args, **kwargs)
        router.enter(chunk, stats)
        try:
            return inner(*args, **kwargs)
        finally:
            router.exit()

    return wrapper


# ---- the handler -------------------------------------------------------------------------------


@register_method(SlicingConfig)
def apply_slicing(model: nn.Module, config: SlicingConfig, adapter: ModelAdapter) -> MethodHandle:
    handle = MethodHandle(model, config)
    stats = handle.stats
    stats.update({"ff_calls_sliced": 0, "attn_calls_sliced": 0, "ff_modules": 0, "attn_modules": 0})
    notes: list[str] = []

    for fqn, block, _ in adapter.blocks(model):
        found = False
        for name in FF_NAMES:
            ff = getattr(block, name, None)
            if isinstance(ff, nn.Module):
                handle.on_remove(wrap_forward(ff, _sliced_ff(config.chunk_tokens, stats)).remove)
                stats["ff_modules"] += 1
                found = True
        if not found and hasattr(block, "proj_mlp"):
            notes.append(
                f"{fqn}: MLP fused with attention (proj_mlp output concatenated with the attention output "
                "before proj_out), not sliced"
            )

    if config.attention_query_chunk > 0:
        for fqn, attn in adapter.attention_modules(model):
            if not _is_self_attention(attn):
                continue
            g = _processor_globals(attn)
            if g is None or not _GlobalsRouter.for_globals(g).routable():
                notes.append(f"{fqn}: processor {type(attn.processor).__name__} has no routable SDPA call, not chunked")
                continue
            wrapper = _chunked_attention(config.attention_query_chunk, stats)
            wrapper.module = attn  # type: ignore[attr-defined]
            handle.on_remove(wrap_forward(attn, wrapper).remove)
            stats["attn_modules"] += 1

    handle.notes = notes  # type: ignore[attr-defined]
    return handle


# ---- VAE helper for user pipelines -------------------------------------------------------------


def enable_vae_memory_savers(pipe: Any, *, slicing: bool = True, tiling: bool = True) -> Callable[[], None]:
    """Turn on diffusers VAE slicing (batch one image at a time) and tiling (decode in tiles) on
    ``pipe.vae`` when the VAE supports them; returns a function that turns them back off.

    Tiling changes the decoded pixels slightly at tile seams (diffusers blends overlaps); slicing is
    exact. A pipeline without a VAE, or a VAE without these methods, is left alone.
    """
    vae = getattr(pipe, "vae", None)
    undo: list[Callable[[], None]] = []
    if vae is not None:
        if tiling and callable(getattr(vae, "enable_tiling", None)):
            was = getattr(vae, "use_tiling", False)
            vae.enable_tiling()
            if not was and callable(getattr(vae, "disable_tiling", None)):
                undo.append(vae.disable_tiling)
        if slicing and callable(getattr(vae, "enable_slicing", None)):
            was = getattr(vae, "use_slicing", False)
            vae.enable_slicing()
            if not was and callable(getattr(vae, "disable_slicing", None)):
                undo.append(vae.disable_slicing)

    def restore() -> None:
        while undo:
            undo.pop()()

    return restore
