"""Fused QKV projections: one (3*dim x dim) GEMM per self-attention instead of three (dim x dim) ones.

Why: a self-attention projects the same input three times (``to_q``, ``to_k``, ``to_v``). The three
weights concatenated give one larger GEMM, with the same FLOPs and the same result up to float
rounding, but one kernel launch and one read of the input instead of three, and a shape that uses
the tensor cores better. Measured on an H100 (``benchmarks/results/dense_baseline.json``, DiT-XL/2,
batch 32, bf16): compiled, fused QKV + ``max-autotune`` reached 62.7% MFU (16.7 ms/step) against
59.0-59.3% for the plain model compiled with ``default`` (17.7 ms/step). Read that gain with care:
``max-autotune`` also turns on CUDA graphs, and fused QKV compiled with ``default`` measured 59.5-59.8%
(``max-autotune-no-cudagraphs``: 59.9%), so under ``torch.compile`` the fusion itself is worth about half
a point and most of the rest comes from the mode (no plain ``max-autotune`` row was measured). Eager, the
fusion matters much more: batch 32 ran at 37.4 ms/step fused against 47.1 ms/step plain (28.1% vs 22.2%
MFU). Use it with ``compile``: this method runs first, at the ``STRUCTURE`` stage.

How: the diffusers recipe (``Attention.fuse_projections()`` and a fused processor), per module:

* ``Attention`` with ``AttnProcessor2_0`` (DiT, PixArt's ``attn1``): ``to_qkv`` and diffusers'
  ``FusedAttnProcessor2_0`` (the same math with one projection GEMM);
* ``Attention`` with ``JointAttnProcessor2_0`` (SD3 / SD3.5 MMDiT): ``to_qkv`` for the image tokens
  and ``to_added_qkv`` for the text tokens, with this module's :class:`FusedJointAttnProcessor`.
  diffusers' own ``FusedJointAttnProcessor2_0`` is not used: in 0.42 it drops the q/k RMS norms
  (``qk_norm``, on in SD3.5) and cannot take a call without text tokens, so it is not the same model;
  ours is ``JointAttnProcessor2_0``'s math with the projections fused;
* ``Attention`` with ``CogVideoXAttnProcessor2_0``: diffusers' ``FusedCogVideoXAttnProcessor2_0``
  (CogVideoX's blocks pass no attention mask, the one input where the two differ in 0.42);
* ``FluxAttention`` (``FluxAttnProcessor``, double and single blocks; the double blocks' text
  projections go to ``to_added_qkv``) and ``WanAttention`` (``WanAttnProcessor``): their processors
  read ``attn.fused_projections`` themselves, so only the projections are fused.

Cross-attention (PixArt / Wan ``attn2``: queries from the latents, keys and values from the text)
is skipped by default: only k and v share an input there, and the text is short. With
``include_cross_attention=True`` their k/v are fused into ``to_kv`` (two GEMMs to one; Wan I2V's
image k/v into ``to_added_kv``).

Skipped, with the reason in ``handle.stats["skipped_reasons"]`` (fqn -> reason) and ``handle.notes``:
modules with no ``fuse_projections``, those whose class says it cannot fuse (``_supports_qkv_fusion``),
those already fused outside diffspeed, those whose processor has no fused counterpart (xformers,
sliced, IP-adapter, a processor another method or the user installed, ...), and those whose q/k/v
projections are not plain ``nn.Linear`` with plain float weights (a quantizer ran first: fuse before
quantizing, as recipes do). If no module at all can be fused, :class:`DiffspeedError` names the model
class and the reasons.

Reversible: the original ``to_q``/``to_k``/``to_v`` stay (the fused layer holds copies of their
weights, so the attention projections' weight memory grows by that much while applied, reported as
``extra_weight_mb``), and ``remove()`` puts the original processors back, deletes the fused layers
and resets ``fused_projections``: outputs are then bit-identical to before. While applied, the fused
layers are also in ``state_dict()``: save the model after ``remove()``. A method that swaps
processors by class name (and so expects the stock one) sees the fused processor instead.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.base import ModelAdapter
from ..errors import DiffspeedError
from ._validate import require_bool
from .base import MethodConfig, MethodHandle, Stage, register_method

# fused layers any fuse_projections() implementation may create
FUSED_NAMES = ("to_qkv", "to_kv", "to_added_qkv", "to_added_kv")
PROJ_NAMES = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


@dataclass(frozen=True)
class FuseQKVConfig(MethodConfig):
    """Fuse each self-attention's q/k/v projections into one GEMM (diffusers' ``fuse_projections``).

    include_cross_attention: also fuse the k/v projections of cross-attention modules (PixArt / Wan
        ``attn2``) into one ``to_kv`` GEMM; off by default (short text sequence, little to gain).
    """

    method: ClassVar[str] = "fuse_qkv"
    stage: ClassVar[Stage] = Stage.STRUCTURE

    include_cross_attention: bool = False

    def __post_init__(self) -> None:
        require_bool(self.method, "include_cross_attention", self.include_cross_attention)


# ---- SD3 / SD3.5 joint attention ----------------------------------------------------------------


class FusedJointAttnProcessor:
    """diffusers' ``JointAttnProcessor2_0`` (0.42) with ``to_qkv`` / ``to_added_qkv``: the same
    operators on the same tensors (q/k RMS norms and context-free calls included), each group of three
    projections as one GEMM. Without ``to_added_qkv`` (not fused) the text projections run separately."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        # `sample` projections: one GEMM
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, N, H*D) -> (B, H, N, D)
            return t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # `context` projections: one GEMM when fused
        if encoder_hidden_states is not None:
            fused = getattr(attn, "to_added_qkv", None)
            if fused is not None:
                ctx_q, ctx_k, ctx_v = fused(encoder_hidden_states).chunk(3, dim=-1)
            else:
                ctx_q = attn.add_q_proj(encoder_hidden_states)
                ctx_k = attn.add_k_proj(encoder_hidden_states)
                ctx_v = attn.add_v_proj(encoder_hidden_states)

            ctx_q, ctx_k, ctx_v = heads(ctx_q), heads(ctx_k), heads(ctx_v)

            if attn.norm_added_q is not None:
                ctx_q = attn.norm_added_q(ctx_q)
            if attn.norm_added_k is not None:
                ctx_k = attn.norm_added_k(ctx_k)

            query = torch.cat([query, ctx_q], dim=2)
            key = torch.cat([key, ctx_k], dim=2)
            value = torch.cat([value, ctx_v], dim=2)

        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1]:],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


# ---- planning -------------------------------------------------------------------------------------


def _fused_processor_for(attn: nn.Module, cross: bool) -> tuple[Callable[[], Any] | None] | str:
    """``(factory of the fused processor, or None to keep the current one,)``, or why not."""
    from diffusers.models import attention_processor as ap

    proc = getattr(attn, "processor", None)
    cls = type(proc)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if cls is ap.AttnProcessor2_0:
        return (ap.FusedAttnProcessor2_0,)
    if cls is ap.JointAttnProcessor2_0 and not cross:
        return (FusedJointAttnProcessor,)
    if cls is ap.CogVideoXAttnProcessor2_0 and not cross:
        return (ap.FusedCogVideoXAttnProcessor2_0,)
    # processors that read attn.fused_projections themselves
    try:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    except ImportError:  # pragma: no cover - older diffusers
        FluxAttnProcessor = None  # type: ignore[assignment,misc]
    try:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor
    except ImportError:  # pragma: no cover - older diffusers
        WanAttnProcessor = None  # type: ignore[assignment,misc]
    if FluxAttnProcessor is not None and cls is FluxAttnProcessor and not cross:
        return (None,)
    if WanAttnProcessor is not None and cls is WanAttnProcessor:
        return (None,)
    return f"processor {name} has no fused counterpart"


def _plain_linear(m: Any) -> bool:
    return (type(m) is nn.Linear and type(m.weight.data) is torch.Tensor and not m.weight.is_meta
            and m.weight.dtype.is_floating_point)


def _plan(attn: nn.Module, include_cross: bool) -> tuple[Callable[[], Any] | None, bool] | str:
    cross = bool(getattr(attn, "is_cross_attention", False))
    if not callable(getattr(attn, "fuse_projections", None)):
        return f"{type(attn).__name__} has no fuse_projections()"
    if not getattr(attn, "_supports_qkv_fusion", True):
        return f"{type(attn).__name__} does not support q/k/v fusion (_supports_qkv_fusion=False)"
    if getattr(attn, "fused_projections", False) or any(getattr(attn, n, None) is not None for n in FUSED_NAMES):
        return "projections already fused outside diffspeed"
    if cross and not include_cross:
        return ("cross-attention (queries from the latents, keys/values from the text: only k/v could be "
                "fused; set include_cross_attention=True)")
    needed = ("to_k", "to_v") if cross else ("to_q", "to_k", "to_v")
    for n in needed:
        if not _plain_linear(getattr(attn, n, None)):
            return (f"{n} is {type(getattr(attn, n, None)).__name__}, not a plain nn.Linear with float weights "
                    "(quantized or wrapped: apply fuse_qkv before weight methods)")
    for n in PROJ_NAMES[3:]:
        m = getattr(attn, n, None)
        if m is not None and not _plain_linear(m):
            return f"{n} is {type(m).__name__}, not a plain nn.Linear with float weights"
    found = _fused_processor_for(attn, cross)
    if isinstance(found, str):
        return found
    return found[0], cross


def _fuse_one(attn: nn.Module, factory: Callable[[], Any] | None) -> tuple[Callable[[], None], list[str]]:
    """Fuse one module; returns (undo, names of the fused layers created)."""
    before = set(attn._modules)
    had_flag = "fused_projections" in attn.__dict__
    old_flag = attn.__dict__.get("fused_projections")
    original = attn.processor
    new_proc = factory() if factory is not None else None
    created: list[str] = []

    def undo() -> None:
        if new_proc is not None and attn.processor is new_proc:
            attn.processor = original
        for n in created or sorted(set(attn._modules) - before):
            if n in attn._modules:
                delattr(attn, n)
        if had_flag:
            attn.fused_projections = old_flag
        else:
            attn.__dict__.pop("fused_projections", None)

    try:
        with torch.no_grad():
            attn.fuse_projections()
        created.extend(sorted(set(attn._modules) - before))
        if not created:
            raise DiffspeedError(f"{type(attn).__name__}.fuse_projections() created no fused layer")
        attn.fused_projections = True  # diffusers' legacy Attention.fuse_projections(fuse=True) sets it too
        if new_proc is not None:
            attn.processor = new_proc  # a plain attribute: the processors here are not nn.Modules
    except Exception:
        undo()
        raise
    return undo, list(created)


# ---- the handler ----------------------------------------------------------------------------------


@register_method(FuseQKVConfig)
def apply_fuse_qkv(model: nn.Module, config: FuseQKVConfig, adapter: ModelAdapter) -> MethodHandle:
    handle = MethodHandle(model, config)
    skipped: dict[str, str] = {}
    planned: list[tuple[str, nn.Module, Callable[[], Any] | None, bool]] = []
    seen: set[int] = set()
    for fqn, attn in adapter.attention_modules(model):
        if id(attn) in seen:
            continue
        seen.add(id(attn))
        plan = _plan(attn, config.include_cross_attention)
        if isinstance(plan, str):
            skipped[fqn] = plan
        else:
            planned.append((fqn, attn, *plan))

    base = getattr(model, "_orig_mod", model)
    if not planned:
        if skipped:
            counts = Counter(skipped.values())
            why = "; ".join(f"{reason} ({n} module{'s' if n > 1 else ''}, e.g. "
                            f"{next(f for f, r in skipped.items() if r == reason)})" for reason, n in counts.items())
        else:
            why = "no attention modules found in its blocks"
        raise DiffspeedError(f"fuse_qkv found nothing to fuse in {type(base).__name__}: {why}")

    stats: dict[str, Any] = {"fused_modules": 0, "fused_self_attention": 0, "fused_cross_attention": 0,
                             "projection_gemms_removed": 0, "extra_weight_mb": 0.0}
    undos: list[Callable[[], None]] = []
    try:
        for _, attn, factory, cross in planned:
            undo, created = _fuse_one(attn, factory)
            undos.append(undo)
            stats["fused_modules"] += 1
            stats["fused_cross_attention" if cross else "fused_self_attention"] += 1
            for n in created:
                layer = getattr(attn, n)
                stats["projection_gemms_removed"] += 2 if n.endswith("qkv") else 1
                stats["extra_weight_mb"] += sum(p.numel() * p.element_size() for p in layer.parameters()) / 2**20
    except Exception:
        for undo in reversed(undos):
            undo()
        raise
    for undo in undos:
        handle.on_remove(undo)
    stats["skipped_modules"] = len(skipped)
    stats["skipped_reasons"] = dict(skipped)
    handle.stats = stats
    handle.notes = [f"{fqn}: {reason}" for fqn, reason in skipped.items()]  # type: ignore[attr-defined]
    return handle
