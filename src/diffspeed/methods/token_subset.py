"""Running a transformer's block stack on a per-row subset of its tokens (shared by the token-reuse methods).

:mod:`.motion_cache` and :mod:`.region_adaptive` both recompute, on a *partial* step, only ``K``
tokens per batch row and give every other token its current input plus a cached block-stack
residual. They differ only in *which* tokens they pick (their selection policy) and in the extra
per-token values they keep in their cache. What they share lives here:

* argument access on block calls (:func:`_get_arg`, :func:`_set_arg`);
* the video families' block arguments (:class:`_Family`, ``_WAN``, ``_COGVIDEOX``) and the gathering
  of their rotary tables / Wan 2.2 TI2V per-token ``temb`` (:func:`_rotary_mode`,
  :func:`_reduce_rotary`, :func:`_gather_rows`);
* :class:`TokenSubsetRunner`: the gather at the first block's input, the reduced arguments of every
  block call, the residual cache refresh after a full run and the scatter after a partial run, plus
  the ``full_steps`` / ``partial_steps`` / ``tokens_*`` / ``skipped_fraction`` statistics. A plan
  with ``idle`` set runs no block at all: every token gets its input plus its cached residual
  (a step on which no token is due; counted in ``idle_steps``).
* Optional *full-context self-attention* (``full_context=True``, Wan and CogVideoX): on a partial step the
  recomputed tokens' queries attend to keys / values of **every** token, not just the recomputed
  subset. Each block's self-attention input (the normalised, modulated hidden states) is cached per
  token; on a partial step the recomputed rows are scattered into that cache (so it always holds
  each token's latest value) and K / V are projected from the whole of it. Without it, a partial
  step changes every recomputed token's attention context (half the sequence missing at ratio
  0.5), which costs far more fidelity than reusing stale residuals does.

A method supplies ``select(st, plan, hidden, rotary) -> bool`` which, when it returns True, has put
``plan["idx"]`` (B, K) sorted token indices, ``plan["rotary"]`` (the reduced rotary table) and
``plan["k"]`` into the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..adapters.base import BlockIO
from ..hooks import wrap_forward
from .base import MethodHandle


# ---- model families -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Family:
    """Where one video family keeps what the token-subset methods need."""

    name: str
    latent_layout: str  # "cfhw": (B, C, F, H, W) (Wan); "fchw": (B, F, C, H, W) (CogVideoX)
    # block call arguments as (position, keyword)
    temb: tuple[int, str]
    rotary: tuple[int, str]


_WAN = _Family("wan", "cfhw", temb=(2, "temb"), rotary=(3, "rotary_emb"))
_COGVIDEOX = _Family("cogvideox", "fchw", temb=(2, "temb"), rotary=(3, "image_rotary_emb"))


def _get_arg(args: tuple, kwargs: dict, spec: tuple[int, str]) -> Any:
    pos, name = spec
    if name in kwargs:
        return kwargs[name]
    return args[pos] if len(args) > pos else None


def _set_arg(args: tuple, kwargs: dict, spec: tuple[int, str], value: Any) -> tuple[tuple, dict]:
    pos, name = spec
    if name in kwargs or len(args) <= pos:
        kwargs = dict(kwargs)
        kwargs[name] = value
        return args, kwargs
    args = args[:pos] + (value,) + args[pos + 1 :]
    return args, kwargs


def _rotary_mode(fam: _Family, rotary: Any, batch: int, n: int) -> str | None:
    """How the rotary table's token axis can be reduced: "none", "row", "shared", or None (unsupported)."""
    if rotary is None:
        return "none"
    parts = rotary if isinstance(rotary, (tuple, list)) else (rotary,)
    if not all(isinstance(t, torch.Tensor) for t in parts):
        return None
    if fam is _WAN and all(t.dim() >= 2 and t.shape[0] in (1, batch) and t.shape[1] == n for t in parts):
        return "row"  # (1 or B, N, 1, d): gather per row
    if fam is _COGVIDEOX and all(t.dim() == 2 and t.shape[0] == n for t in parts):
        return "shared"  # (N, d): one selection for the whole batch
    return None


def _gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t: (1 or B, N, ...), idx: (B, K) -> (B, K, ...)."""
    if t.shape[0] == 1:
        return t[0][idx]
    bidx = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1)
    return t[bidx, idx]


def _reduce_rotary(rotary: Any, mode: str, idx: torch.Tensor) -> Any:
    if mode == "none":
        return rotary
    if mode == "row":
        fn = lambda t: _gather_rows(t, idx)  # noqa: E731
    else:
        fn = lambda t: t[idx[0]]  # noqa: E731
    if isinstance(rotary, (tuple, list)):
        return type(rotary)(fn(t) for t in rotary)
    return fn(rotary)


# ---- full-context self-attention (Wan) ---------------------------------------------------------
def _wan_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """diffusers' WanAttnProcessor rotary embedding, op for op (so ratio 1.0 stays bit-identical)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _attn_supported(fam: _Family | None, attn: nn.Module) -> bool:
    """A stock diffusers self-attention of the family (its default processor; Wan: no image K/V)."""
    proc = type(getattr(attn, "processor", None)).__name__
    if getattr(attn, "is_cross_attention", False) or not hasattr(attn, "to_out"):
        return False
    if fam is _WAN:
        return proc == "WanAttnProcessor" and getattr(attn, "add_k_proj", None) is None
    if fam is _COGVIDEOX:
        return proc == "CogVideoXAttnProcessor2_0" and not getattr(attn, "fused_projections", False)
    return False


def _wan_self_attention(attn: nn.Module, x_q: torch.Tensor, x_kv: torch.Tensor, rot_q: Any, rot_kv: Any,
                        mask: Any = None) -> torch.Tensor:
    """Wan self-attention with queries from ``x_q`` (B, K, D) and keys / values from ``x_kv`` (B, N, D).

    Mirrors ``WanAttnProcessor`` (same ops in the same order); with ``x_q is x_kv`` it equals it.
    """
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    if getattr(attn, "fused_projections", False):
        w_q, w_k, w_v = attn.to_qkv.weight.chunk(3, dim=0)
        b_q, b_k, b_v = (attn.to_qkv.bias.chunk(3, dim=0) if attn.to_qkv.bias is not None else (None,) * 3)
        query = torch.nn.functional.linear(x_q, w_q, b_q)
        key = torch.nn.functional.linear(x_kv, w_k, b_k)
        value = torch.nn.functional.linear(x_kv, w_v, b_v)
    else:
        query, key, value = attn.to_q(x_q), attn.to_k(x_kv), attn.to_v(x_kv)
    query = attn.norm_q(query)
    key = attn.norm_k(key)
    query = query.unflatten(2, (attn.heads, -1))
    key = key.unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))
    if rot_q is not None:
        query = _wan_rotary(query, *rot_q)
        key = _wan_rotary(key, *rot_kv)
    backend = getattr(attn.processor, "_attention_backend", None)
    out = dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False, backend=backend,
                                parallel_config=None)
    out = out.flatten(2, 3).type_as(query)
    out = attn.to_out[0](out)
    return attn.to_out[1](out)


def _cogvideox_self_attention(attn: nn.Module, x_q: torch.Tensor, x_kv: torch.Tensor, enc: torch.Tensor,
                              rot_q: Any, rot_kv: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """CogVideoX joint text/video attention with video queries ``x_q`` (B, K, D) and video K / V from ``x_kv``.

    Mirrors ``CogVideoXAttnProcessor2_0`` (same ops in the same order); the text tokens attend to
    (and are attended by) every video token.
    """
    from diffusers.models.embeddings import apply_rotary_emb

    text = enc.size(1)
    h_q = torch.cat([enc, x_q], dim=1)
    h_kv = torch.cat([enc, x_kv], dim=1)
    b = h_q.shape[0]
    query = attn.to_q(h_q)
    key = attn.to_k(h_kv)
    value = attn.to_v(h_kv)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if rot_q is not None:
        query[:, :, text:] = apply_rotary_emb(query[:, :, text:], rot_q)
        key[:, :, text:] = apply_rotary_emb(key[:, :, text:], rot_kv)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim)
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    enc_out, hidden = out.split([text, out.size(1) - text], dim=1)
    return hidden, enc_out


# ---- the partial-run machinery ------------------------------------------------------------------
Select = Callable[[dict, dict, torch.Tensor, Any], bool]
CacheFields = Callable[[Any, torch.Tensor], dict]
PartialHook = Callable[[dict, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def subset_handle(model: nn.Module, config: Any, name: str) -> tuple[MethodHandle, Any, str, dict]:
    """(handle, step context, per-branch state key, stats) of a token-subset method, stats zeroed."""
    from ..context import get_context

    handle = MethodHandle(model, config)
    key = f"{name}@{id(handle)}"
    handle.state_key = key  # type: ignore[attr-defined]
    handle.stats.update({"full_steps": 0, "partial_steps": 0, "idle_steps": 0, "tokens_recomputed": 0,
                         "tokens_reused": 0, "skipped_fraction": 0.0})
    return handle, get_context(model), key, handle.stats


def partial_step_allowed(ctx: Any, config: Any, st: dict, needs: tuple[str, ...] = ("cache",)) -> bool:
    """The shared schedule: no partial step during ``warmup_steps`` or the last ``final_steps``, at most
    ``full_every - 1`` partial steps in a row, and only once the branch state has ``needs``."""
    step, total = ctx.step_index, ctx.num_steps
    if step < config.warmup_steps or (total is not None and step >= total - config.final_steps):
        return False
    if st.get("partials", 0) >= config.full_every - 1:
        return False
    return all(k in st for k in needs)


class TokenSubsetRunner:
    """Gathers a per-row token subset at block 0, reduces every block call, scatters after the last block.

    The per-forward ``plan`` (in ``ctx.state(key)["plan"]``, set by the method's model wrapper with
    ``partial``, ``latent`` and ``started``) drives it; the per-branch ``"cache"`` holds
    ``residual``, ``age`` and ``hits`` plus what ``cache_fields`` adds.

    fam: the video family whose rotary / temb block arguments are reduced; None = none (image models).
    select: the method's selection policy (see the module docstring).
    cache_fields: ``(old_cache, residual) -> dict`` of extra entries stored after a full run.
    on_partial_residual: ``(cache, residual, new_res, idx_d, idx)`` called after a partial run,
        before the cached residual is updated (``residual`` still holds the old values).
    require_3d: keep the cache only for (B, N, D) hidden states.
    full_context: on partial steps the recomputed tokens' self-attention reads keys / values of all
        tokens (cached self-attention inputs, refreshed row by row); Wan / CogVideoX blocks with their
        stock attention processor only, others keep the subset-only attention. See the module docstring.
    """

    def __init__(self, ctx: Any, key: str, stats: dict, n_blocks: int, fam: _Family | None, select: Select,
                 cache_fields: CacheFields, on_partial_residual: PartialHook | None = None,
                 require_3d: bool = False, full_context: bool = False) -> None:
        self.ctx, self.key, self.stats, self.n_blocks, self.fam = ctx, key, stats, n_blocks, fam
        self.select, self.cache_fields, self.on_partial_residual = select, cache_fields, on_partial_residual
        self.require_3d = require_3d
        self.full_context = full_context and fam is not None

    def reduce_args(self, plan: dict, first: bool, io: BlockIO, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        idx = plan["idx"]
        fam = self.fam
        if first:
            hidden = plan["h_in"]
            small = hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            args, kwargs = _set_arg(args, kwargs, (0, io.hidden_arg), small)
        if fam is None:
            return args, kwargs
        if plan["rotary_present"]:
            args, kwargs = _set_arg(args, kwargs, fam.rotary, plan["rotary"])
        if fam is _WAN:
            temb = _get_arg(args, kwargs, fam.temb)
            if isinstance(temb, torch.Tensor) and temb.dim() == 4 and temb.shape[1] == plan["h_in"].shape[1]:
                if "temb" not in plan:  # Wan 2.2 TI2V: per-token modulation (B, N, 6, D)
                    plan["temb"] = _gather_rows(temb, idx)
                args, kwargs = _set_arg(args, kwargs, fam.temb, plan["temb"])
        return args, kwargs

    def start(self, st: dict, plan: dict, io: BlockIO, args: tuple, kwargs: dict) -> None:
        stats = self.stats
        hidden, _ = io.get_states(args, kwargs)
        plan["h_in"] = hidden
        plan["started"] = True
        rotary = _get_arg(args, kwargs, self.fam.rotary) if self.fam is not None else None
        plan["rotary_present"] = rotary is not None
        plan["rotary_full"] = rotary
        plan["attn_in"] = {}
        b, n = hidden.shape[:2]
        cache = st.get("cache")
        idle = bool(plan.get("idle")) and cache is not None and cache["residual"].shape == hidden.shape
        plan["idle"] = idle
        partial = (not idle and plan["partial"] and (not self.require_3d or hidden.dim() == 3)
                   and self.select(st, plan, hidden, rotary))
        plan["partial"] = partial
        if idle:  # no token is due: every token reuses its cached residual, no block runs
            stats["idle_steps"] += 1
            stats["tokens_reused"] += b * n
        elif partial:
            k = plan["k"]
            st["partials"] = st.get("partials", 0) + 1
            stats["partial_steps"] += 1
            stats["tokens_recomputed"] += b * k
            stats["tokens_reused"] += b * (n - k)
        else:
            st["partials"] = 0
            stats["full_steps"] += 1
            stats["tokens_recomputed"] += b * n
        total = stats["tokens_recomputed"] + stats["tokens_reused"]
        stats["skipped_fraction"] = stats["tokens_reused"] / total if total else 0.0

    def finish_full(self, st: dict, plan: dict, io: BlockIO, out: Any) -> Any:
        h_out, _ = io.split_output(out)
        h_in = plan["h_in"]
        if h_out.shape != h_in.shape or (self.require_3d and h_in.dim() != 3):
            st.pop("cache", None)
            return out
        residual = h_out - h_in
        extra = self.cache_fields(st.get("cache"), residual)
        st["cache"] = {
            "residual": residual,
            **extra,
            "age": torch.zeros(residual.shape[:2], dtype=torch.int32, device=residual.device),
        }
        attn_in = plan.get("attn_in") or {}
        if self.full_context and len(attn_in) == self.n_blocks:
            st["cache"]["attn_in"] = attn_in  # per block: the self-attention input of every token
        return out

    def finish_partial(self, st: dict, plan: dict, io: BlockIO, out: Any) -> Any:
        h_small, encoder = io.split_output(out)
        cache = st["cache"]
        h_in, idx = plan["h_in"], plan["idx"]
        idx_d = idx.unsqueeze(-1).expand(-1, -1, h_in.shape[-1])
        res = cache["residual"]
        new_res = h_small - h_in.gather(1, idx_d)
        if self.on_partial_residual is not None:
            self.on_partial_residual(cache, res, new_res, idx_d, idx)
        full = h_in + res  # reused tokens: current input + cached residual
        full.scatter_(1, idx_d, h_small.to(full.dtype))
        res.scatter_(1, idx_d, new_res.to(res.dtype))
        age = cache["age"] + 1
        age.scatter_(1, idx, 0)
        cache["age"] = age
        cache["hits"].scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.int32))
        return io.make_output(full, encoder)

    def block_wrapper(self, i: int, io: BlockIO, inner: Any, *args: Any, **kwargs: Any) -> Any:
        st = self.ctx.state(self.key)
        plan = st.get("plan")
        if plan is None or (i > 0 and not plan["started"]):
            return inner(*args, **kwargs)  # a block called outside a model forward: untouched
        plan["block"] = i
        if i == 0:
            self.start(st, plan, io, args, kwargs)
        if plan["idle"]:
            if i == 0:
                cache = st["cache"]
                cache["age"] = cache["age"] + 1
                _, encoder = io.get_states(args, kwargs)
                out = io.make_output(plan["h_in"] + cache["residual"], encoder)
            else:
                out = io.pass_through(args, kwargs)  # the residual was added at block 0
            if i == self.n_blocks - 1:
                plan["started"] = False
            return out
        if plan["partial"]:
            args, kwargs = self.reduce_args(plan, i == 0, io, args, kwargs)
        out = inner(*args, **kwargs)
        if i == self.n_blocks - 1:
            out = self.finish_partial(st, plan, io, out) if plan["partial"] else self.finish_full(st, plan, io, out)
            plan["started"] = False
        return out

    def attn_wrapper(self, i: int, attn: nn.Module, inner: Any, *args: Any, **kwargs: Any) -> Any:
        """Block ``i``'s self-attention: record its full input on full runs, attend to all tokens on partial ones."""
        st = self.ctx.state(self.key)
        plan = st.get("plan")
        if plan is None or not plan.get("started") or plan.get("block") != i:
            return inner(*args, **kwargs)
        wan = self.fam is _WAN
        if wan:
            x = args[0] if args else kwargs.get("hidden_states")
            call_ok = (len(args) <= 1 or args[1] is None) and kwargs.get("encoder_hidden_states") is None
            mask = args[2] if len(args) > 2 else kwargs.get("attention_mask")
            rot_q = args[3] if len(args) > 3 else kwargs.get("rotary_emb")
        else:  # CogVideoX: attn1(hidden_states=..., encoder_hidden_states=..., image_rotary_emb=...)
            x = kwargs.get("hidden_states")
            enc = kwargs.get("encoder_hidden_states")
            call_ok = (not args and isinstance(enc, torch.Tensor)
                       and set(kwargs) <= {"hidden_states", "encoder_hidden_states", "image_rotary_emb"})
            mask, rot_q = None, kwargs.get("image_rotary_emb")
        call_ok = call_ok and isinstance(x, torch.Tensor) and x.dim() == 3
        if not plan["partial"]:
            if call_ok and x.shape == plan["h_in"].shape:
                plan["attn_in"][i] = x
            return inner(*args, **kwargs)
        cached = st["cache"].get("attn_in")
        x_full = cached.get(i) if cached is not None else None
        if x_full is None or not call_ok or x_full.dtype != x.dtype or not _attn_supported(self.fam, attn):
            return inner(*args, **kwargs)  # subset-only attention
        idx = plan["idx"]
        x_full.scatter_(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)  # latest value of every token
        rot_kv = plan["rotary_full"] if rot_q is not None else None
        if wan:
            return _wan_self_attention(attn, x, x_full, rot_q, rot_kv, mask)
        return _cogvideox_self_attention(attn, x, x_full, enc, rot_q, rot_kv)

    def wrap_block(self, handle: MethodHandle, i: int, block: nn.Module, io: BlockIO) -> None:
        fn = lambda inner, *a, _i=i, _io=io, **k: self.block_wrapper(_i, _io, inner, *a, **k)  # noqa: E731
        handle.on_remove(wrap_forward(block, fn).remove)
        attn = getattr(block, "attn1", None) if self.full_context else None
        if isinstance(attn, nn.Module):
            afn = lambda inner, *a, _i=i, _m=attn, **k: self.attn_wrapper(_i, _m, inner, *a, **k)  # noqa: E731
            handle.on_remove(wrap_forward(attn, afn).remove)
