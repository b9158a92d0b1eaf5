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

* **Wan operator grouping** (``wan_grouping``, on by default): on ``WanTransformer3DModel`` the
  attention preamble and the block's modulation are the rest of the activation peak (measured on an
  H100, Wan-1.3B size, 32760 tokens, bf16: FF + SDPA chunking left ~1150 MB of activations whatever
  the chunk). diffusers' ``WanAttnProcessor`` projects, RMS-normalises and rotates (float64 rotary
  frequencies: ``x1 * cos`` etc. are float64 tensors of tokens x dim/2) the whole sequence, and
  ``WanTransformerBlock`` evaluates ``norm(x.float()) * (1 + scale) + shift`` and the gated residuals
  in float32 on the whole sequence. Every ``WanAttention`` (self and text cross-attention) gets a
  grouped copy of the processor's math: k/v (projection, norm_k, rotary) chunk by chunk into
  full-length model-dtype tensors, then per ``attention_query_chunk`` queries: to_q, norm_q, rotary,
  SDPA against the full k/v, to_out into a preallocated output; and each block's forward runs the
  same float32 expressions per ``chunk_tokens`` rows into model-dtype buffers. Same operators on the
  same rows, same dtype casts: bit-identical to the unsliced run in our fp32 and bf16 CPU tests (at
  worst SDPA rounding of a different query tiling, as for query chunking). The processor is swapped
  by ``apply`` and the original put back by ``remove()``; a Wan attention module whose processor is
  not diffusers' ``WanAttnProcessor`` (user-set, or another method's) is refused with a
  :class:`DiffspeedError`. Not grouped: the model-level ``norm_out`` modulation after the last block
  (float32 on the whole sequence, in ``WanTransformer3DModel.forward``), and Wan 2.2 TI2V's
  per-token modulation tensors, which are model inputs.

Not sliced (stated in ``handle.notes``): Flux single-stream blocks fuse the MLP (``proj_mlp`` ->
``act_mlp``) with attention: the MLP hidden layer is concatenated with the attention output before
the shared ``proj_out``, so the full-size tensor is materialised regardless and slicing it would need
a rewrite of the block's forward. Their attention is still query-chunked. Cross-attention modules
(PixArt / Wan ``attn2``) are left alone: their key length is the short text sequence, so their score
matrix is small (Wan cross-attention is grouped as above).

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
    wan_grouping: on Wan (``WanTransformer3DModel``), group whole operators by token chunks: every
        ``WanAttention``'s processor is replaced by a grouped one (q/k/v projections, q/k norms and
        the float64 rotary embedding per chunk, ``attention_query_chunk`` tokens each; needs
        ``attention_query_chunk > 0``) and each block's float32 modulation / residual updates run per
        ``chunk_tokens`` chunk. Refused if a Wan attention module has a processor other than
        diffusers' ``WanAttnProcessor`` (set ``wan_grouping=False`` to fall back to SDPA chunking).
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
    wan_grouping: bool = True

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
        if not isinstance(self.wan_grouping, bool):
            raise DiffspeedError(f"slicing wan_grouping must be true or false, got {self.wan_grouping!r}")


# ---- feed-forward slicing ----------------------------------------------------------------------


def _sliced_ff(chunk: int, stats: dict[str, float]) -> Callable[..., Any]:
    def wrapper(inner: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() < 3 or hidden_states.shape[-2] <= chunk:
            return inner(hidden_states, *args, **kwargs)
        stats["ff_calls_sliced"] += 1
        # contiguous: a (B>1, chunk, C) slice would take the batched-GEMM path of the linear layers, whose
        # rounding differs from the full run's folded 2-D GEMM (seen in bf16 on CPU)
        parts = [inner(h.contiguous(), *args, **kwargs) for h in hidden_states.split(chunk, dim=-2)]
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


# ---- Wan operator grouping ---------------------------------------------------------------------
#
# diffusers' WanAttnProcessor runs its preamble on the whole sequence: q/k/v projections, q/k
# RMSNorm and the rotary embedding, whose frequencies are float64 (x1 * cos etc. promote the
# half-width q/k halves to float64 temporaries of tokens x dim/2). WanTransformerBlock computes its
# modulation and residual updates in float32 on the full sequence. Those full-length fp32/fp64
# temporaries, not the feed-forward or the scores, are what is left of the activation peak once the
# rest is sliced. The replacements below run the very same operators on row chunks and write the
# results into preallocated tensors of the model dtype, so only one chunk's wide temporaries exist.


def _wan_classes() -> tuple[type, type, type] | None:
    try:
        from diffusers.models.transformers import transformer_wan as wan
    except Exception:  # noqa: BLE001 - diffusers without Wan: nothing to group
        return None
    return wan.WanAttention, wan.WanAttnProcessor, wan.WanTransformerBlock


def _wan_rope(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """The ``apply_rotary_emb`` of diffusers' WanAttnProcessor (0.42), verbatim: float64 math, cast back."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


def _rows(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Token rows [start, stop) of a (B, S, ...) tensor; a tensor broadcast over tokens passes whole."""
    return t if t.shape[1] == 1 else t[:, start:stop]


class _WanGroupedAttnProcessor:
    """Stands in for one attention module's ``WanAttnProcessor``; same math, grouped by token chunks.

    Self-attention: k, v (to_k/to_v, norm_k, rotary) are computed chunk by chunk into full-length
    tensors of the model dtype; then, per query chunk, to_q + norm_q + rotary, SDPA against the full
    k/v, and to_out into a preallocated output. Cross-attention (Wan ``attn2``): k/v of the text (and
    image, I2V) are computed as diffusers does, the query side is chunked the same way. Calls it
    cannot group (an attention mask, context parallelism, extra kwargs, training-mode dropout, short
    sequences, unexpected rotary shapes) and calls after ``remove()`` go to the original processor.
    ``_attention_backend`` / ``_parallel_config`` are read from and written to the original, so
    diffusers' ``set_attention_backend`` keeps working.
    """

    def __init__(self, original: Any, chunk: int, stats: dict[str, float]) -> None:
        self.__dict__["original"] = original
        self.__dict__["chunk"] = chunk
        self.__dict__["stats"] = stats
        self.__dict__["active"] = True

    def __getattr__(self, name: str) -> Any:  # _attention_backend, _parallel_config, ...
        original = self.__dict__.get("original")
        if original is None:  # half-built copy (copy / pickle)
            raise AttributeError(name)
        return getattr(original, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__:
            self.__dict__[name] = value
        else:
            setattr(self.__dict__["original"], name, value)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        orig = self.original
        chunk = self.chunk
        n = hidden_states.shape[1] if isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 3 else 0
        self_attn = encoder_hidden_states is None
        dropout = attn.to_out[1]
        if (
            not self.active
            or kwargs
            or n <= chunk
            or attention_mask is not None
            or (self_attn and (orig._parallel_config is not None or attn.add_k_proj is not None))
            or (not self_attn and rotary_emb is not None)  # Wan's blocks never pass one to attn2
            or (attn.training and getattr(dropout, "p", 0.0) > 0)
            or not self._rotary_ok(rotary_emb, n)
        ):
            return orig(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        # looked up per call, like the original: anything that routes this module global still applies
        dispatch = type(orig).__call__.__globals__["dispatch_attention_fn"]
        backend = orig._attention_backend
        fused = getattr(attn, "fused_projections", False)
        heads = attn.heads
        bsz = hidden_states.shape[0]

        def rope(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            if rotary_emb is None:
                return x
            return _wan_rope(x, _rows(rotary_emb[0], start, stop), _rows(rotary_emb[1], start, stop))

        spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
        query_all = key = value = key_img = value_img = None
        if self_attn:
            for s, e in spans:
                h = hidden_states[:, s:e].contiguous()  # 2-D GEMM like the full run (see _sliced_ff)
                if fused:
                    q, k, v = attn.to_qkv(h).chunk(3, dim=-1)
                else:
                    k, v = attn.to_k(h), attn.to_v(h)
                k = rope(attn.norm_k(k).unflatten(2, (heads, -1)), s, e)
                v = v.unflatten(2, (heads, -1))
                if key is None:
                    key = k.new_empty((bsz, n, *k.shape[2:]))
                    value = v.new_empty((bsz, n, *v.shape[2:]))
                key[:, s:e] = k
                value[:, s:e] = v
                if fused:  # the fused GEMM made q anyway: keep it (model dtype) rather than recompute
                    q = rope(attn.norm_q(q).unflatten(2, (heads, -1)), s, e)
                    if query_all is None:
                        query_all = q.new_empty((bsz, n, *q.shape[2:]))
                    query_all[:, s:e] = q
                del k, v
        else:
            enc = encoder_hidden_states
            if attn.add_k_proj is not None:
                # 512 is the context length of the text encoder, hardcoded in diffusers too
                image_context_length = enc.shape[1] - 512
                enc_img = enc[:, :image_context_length]
                enc = enc[:, image_context_length:]
                if fused:
                    key_img, value_img = attn.to_added_kv(enc_img).chunk(2, dim=-1)
                else:
                    key_img, value_img = attn.add_k_proj(enc_img), attn.add_v_proj(enc_img)
                key_img = attn.norm_added_k(key_img).unflatten(2, (heads, -1))
                value_img = value_img.unflatten(2, (heads, -1))
            if fused:
                key, value = attn.to_kv(enc).chunk(2, dim=-1)
            else:
                key, value = attn.to_k(enc), attn.to_v(enc)
            key = attn.norm_k(key).unflatten(2, (heads, -1))
            value = value.unflatten(2, (heads, -1))

        out = None
        for s, e in spans:
            if query_all is not None:
                q = query_all[:, s:e]
            else:
                q = rope(attn.norm_q(attn.to_q(hidden_states[:, s:e].contiguous())).unflatten(2, (heads, -1)), s, e)
            o = dispatch(q, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, backend=backend,
                         parallel_config=None)
            o = o.flatten(2, 3).type_as(q)
            if key_img is not None:
                o_img = dispatch(q, key_img, value_img, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 backend=backend, parallel_config=None)
                o = o + o_img.flatten(2, 3).type_as(q)
                del o_img
            o = attn.to_out[1](attn.to_out[0](o))
            if out is None:
                out = o.new_empty((bsz, n, *o.shape[2:]))
            out[:, s:e] = o
            del q, o
        self.stats["attn_calls_grouped"] += 1
        self.stats["attn_calls_sliced"] += 1
        return out

    @staticmethod
    def _rotary_ok(rotary_emb: Any, n: int) -> bool:
        if rotary_emb is None:
            return True
        if not (isinstance(rotary_emb, (tuple, list)) and len(rotary_emb) == 2):
            return False
        return all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] in (1, n) for t in rotary_emb)


def _install_wan_processor(attn: nn.Module, chunk: int, stats: dict[str, float]) -> Callable[[], None]:
    original = attn.processor
    grouped = _WanGroupedAttnProcessor(original, chunk, stats)
    attn.processor = grouped

    def restore() -> None:
        grouped.active = False  # if someone re-installs it later, it is a plain pass-through
        if attn.processor is grouped:
            attn.processor = original

    return restore


def _grouped_wan_block(chunk: int, stats: dict[str, float], block_forward: Callable[..., Any]) -> Callable[..., Any]:
    """Wrapper for ``WanTransformerBlock.forward``: diffusers' math (0.42) with the full-length float32
    modulation / residual expressions evaluated per token chunk into model-dtype buffers. It only
    replaces the original forward itself: if anything else sits inside it in the wrapper chain (or
    the call has extra arguments), the inner forward runs unchanged."""

    def wrapper(inner: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(inner, "__func__", None) is not block_forward or kwargs or len(args) != 4:
            return inner(*args, **kwargs)
        hidden_states, encoder_hidden_states, temb, rotary_emb = args
        n = hidden_states.shape[1] if isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 3 else 0
        if n <= chunk or not isinstance(temb, torch.Tensor) or temb.ndim not in (3, 4):
            return inner(*args, **kwargs)
        self = inner.__self__
        if temb.ndim == 4:
            # temb: batch_size, seq_len, 6, inner_dim (wan2.2 ti2v)
            shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
                self.scale_shift_table.unsqueeze(0) + temb.float()
            ).chunk(6, dim=2)
            shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
                t.squeeze(2) for t in (shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa)
            )
        else:
            shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
                self.scale_shift_table + temb.float()
            ).chunk(6, dim=1)
        spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
        # under autograd, leave every tensor we did not allocate unmodified and never update in place
        inplace = not torch.is_grad_enabled()

        # 1. Self-attention
        norm_hidden_states = torch.empty_like(hidden_states)
        for s, e in spans:
            norm_hidden_states[:, s:e] = (
                self.norm1(hidden_states[:, s:e].float()) * (1 + _rows(scale_msa, s, e)) + _rows(shift_msa, s, e)
            ).type_as(hidden_states)
        attn_output = self.attn1(norm_hidden_states, None, None, rotary_emb)
        del norm_hidden_states
        new_hidden = torch.empty_like(hidden_states)
        for s, e in spans:
            new_hidden[:, s:e] = (
                hidden_states[:, s:e].float() + attn_output[:, s:e] * _rows(gate_msa, s, e)
            ).type_as(hidden_states)
        hidden_states = new_hidden
        del attn_output, new_hidden

        # 2. Cross-attention
        norm_hidden_states = torch.empty_like(hidden_states)
        for s, e in spans:
            norm_hidden_states[:, s:e] = self.norm2(hidden_states[:, s:e].float()).type_as(hidden_states)
        attn_output = self.attn2(norm_hidden_states, encoder_hidden_states, None, None)
        del norm_hidden_states
        hidden_states = hidden_states.add_(attn_output) if inplace else hidden_states + attn_output
        del attn_output

        # 3. Feed-forward
        norm_hidden_states = torch.empty_like(hidden_states)
        for s, e in spans:
            norm_hidden_states[:, s:e] = (
                self.norm3(hidden_states[:, s:e].float()) * (1 + _rows(c_scale_msa, s, e)) + _rows(c_shift_msa, s, e)
            ).type_as(hidden_states)
        ff_output = self.ffn(norm_hidden_states)
        del norm_hidden_states
        out = hidden_states if inplace else torch.empty_like(hidden_states)
        for s, e in spans:
            out[:, s:e] = (
                hidden_states[:, s:e].float() + ff_output[:, s:e].float() * _rows(c_gate_msa, s, e)
            ).type_as(hidden_states)
        stats["block_calls_grouped"] += 1
        return out

    return wrapper


# ---- the handler -------------------------------------------------------------------------------


@register_method(SlicingConfig)
def apply_slicing(model: nn.Module, config: SlicingConfig, adapter: ModelAdapter) -> MethodHandle:
    handle = MethodHandle(model, config)
    stats = handle.stats
    stats.update({"ff_calls_sliced": 0, "attn_calls_sliced": 0, "ff_modules": 0, "attn_modules": 0,
                  "attn_calls_grouped": 0, "block_calls_grouped": 0, "grouped_attn_modules": 0,
                  "grouped_blocks": 0})
    notes: list[str] = []

    # Wan operator grouping: check every Wan attention processor before touching anything
    wan = _wan_classes() if config.wan_grouping else None
    wan_attn: list[tuple[str, nn.Module]] = []
    if wan is not None:
        wan_attention_cls, wan_processor_cls, _ = wan
        wan_attn = [(fqn, a) for fqn, a in adapter.attention_modules(model) if isinstance(a, wan_attention_cls)]
        if wan_attn and config.attention_query_chunk > 0:
            bad = [f"{fqn} ({type(a.processor).__module__}.{type(a.processor).__qualname__})"
                   for fqn, a in wan_attn if type(a.processor) is not wan_processor_cls]
            if bad:
                raise DiffspeedError(
                    "slicing wan_grouping replaces diffusers' WanAttnProcessor with a grouped copy of its math, "
                    f"but these Wan attention modules use another processor: {', '.join(bad[:4])}"
                    f"{f' and {len(bad) - 4} more' if len(bad) > 4 else ''}; its math is unknown, so it cannot be "
                    "grouped exactly. Restore the default processor, or use SlicingConfig(wan_grouping=False) "
                    "for plain SDPA query chunking"
                )
        elif wan_attn:
            notes.append("wan_grouping: attention_query_chunk=0, Wan attention not grouped")
            wan_attn = []

    for fqn, block, _ in adapter.blocks(model):
        if wan is not None and isinstance(block, wan[2]):
            block_forward = wan[2].forward
            if type(block).forward is not block_forward:
                notes.append(f"{fqn}: {type(block).__name__} overrides WanTransformerBlock.forward, block math not grouped")
            else:
                handle.on_remove(wrap_forward(
                    block, _grouped_wan_block(config.chunk_tokens, stats, block_forward), innermost=True).remove)
                stats["grouped_blocks"] += 1
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

    grouped_ids = set()
    for fqn, attn in wan_attn:
        handle.on_remove(_install_wan_processor(attn, config.attention_query_chunk, stats))
        grouped_ids.add(id(attn))
        stats["grouped_attn_modules"] += 1

    if config.attention_query_chunk > 0:
        for fqn, attn in adapter.attention_modules(model):
            if id(attn) in grouped_ids or not _is_self_attention(attn):
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
