"""Region-adaptive sampling (after RAS, "Region-Adaptive Sampling for Diffusion Transformers", 2025).

Idea: from one denoising step to the next, the model's output changes a lot in some regions (the
ones being "drawn" right now) and little elsewhere. So per step only the tokens of the regions with
the largest expected change run through the block stack; the others reuse cached values.

Design (per forward call of the transformer; state per CFG branch):

* **Expected change**: a wrapper on the top-level forward captures the model *output* of every call
  (noise / velocity prediction, latent space; DiT's learned-sigma channels are dropped). After the
  call, ``score = mean |out_t - out_{t-1}|`` over the channels and the token's patch (``avg_pool``
  to the token grid: ``(H/p, W/p)`` for DiT / PixArt, ``(F/pt, H/ph, W/pw)`` for Wan), shape
  ``(B, N)``. The next step recomputes the tokens with the largest score (the output change of the
  previous step is RAS's proxy for where the sample is changing now).
* **Starvation**: per token, the number of steps since its cached residual was computed
  (``age``). A token that would be reused for more than ``starvation_steps`` steps is recomputed
  first (oldest first), ahead of the scored ones, so every region is refreshed periodically.
  (With ``full_every - 1 <= starvation_steps``, the defaults, a full step always comes first;
  the counter matters when ``full_every`` is larger.)
* **Schedule**: the first ``warmup_steps``, the last ``final_steps`` and every ``full_every``-th
  step (at most ``full_every - 1`` partial steps in a row) are full: every token runs through the
  blocks and the per-token cache (block-stack residual ``h_out - h_in``) is refreshed.
* **Partial steps** run the *whole block stack on* ``K = ceil(recompute_ratio * N)`` tokens per
  sample, gathered at the first block's input (real compute saved: the attention and MLPs see K
  tokens). DiT / PixArt add their positions before the blocks (nothing to gather); Wan's rotary
  table rows and the per-token ``temb`` of Wan 2.2 TI2V are gathered (:mod:`.token_subset`).
  After the last block, recomputed tokens take their new output; every other token gets its
  current input plus its cached residual. The patch embedding and output head always run on all
  tokens, so every token sees the current latent and timestep.
* **The approximation**: recomputed tokens attend only to each other on a partial step, and reused
  tokens carry a stale residual. ``recompute_ratio=1.0`` runs every token through the same
  gather/scatter path and is bit-identical to the unmodified model (tested).

Selection is ``topk`` on the device with a static ``K``: no device-to-host sync, static shapes.
Each batch row (batched CFG included) picks its own tokens.

Shared with :mod:`.motion_cache` through :mod:`.token_subset`: the partial-run machinery
(:class:`~.token_subset.TokenSubsetRunner`: gather at block 0, Wan's rotary / temb gathering,
scatter after the last block, statistics); from :mod:`.motion_cache` Wan's patch size and from
:mod:`.token_merge` the image/video token grid. This module keeps only its selection policy
(``select``), its output-change score and the image models' key/value cache.

``handle.stats``: ``full_steps``, ``partial_steps`` (forward calls), ``tokens_recomputed`` (token
rows run through the blocks, full steps included), ``tokens_reused``, ``skipped_fraction``.
``handle.state_key`` names the per-branch state; its ``"cache"`` holds ``residual``, ``age`` and
``hits`` (partial steps each token was recomputed in), ``"score"`` the latest expected change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.base import ModelAdapter
from ..errors import DiffspeedError, IncompatibleMethodsError
from ..hooks import output_tensor, wrap_forward
from ._validate import grid_kind, require_bool, require_int, require_recompute_ratio, unwrap as _unwrap
from .base import MethodConfig, MethodHandle, Stage, applied_methods, register_method
from .motion_cache import patch_size as _wan_patch_size
from .token_subset import _WAN, TokenSubsetRunner, _reduce_rotary, _rotary_mode, partial_step_allowed, subset_handle
from .token_merge import token_grid as _token_grid

_EPS = 1e-12
_STATE_REASON = (
    "region_adaptive runs the blocks on a changing subset of tokens on partial steps and keeps a per-token "
    "residual cache; {other} {why}; use one of them"
)


@dataclass(frozen=True)
class RegionAdaptiveConfig(MethodConfig):
    """Recompute the tokens whose model output changed most last step; reuse the rest (RAS).

    recompute_ratio: fraction of tokens run through the blocks on a partial step; 1.0 = all (exact).
    warmup_steps: the first steps are computed in full (they also seed the output-change score).
    full_every: at most ``full_every - 1`` partial steps in a row; the next one is full.
    final_steps: the last steps are computed in full; needs a known step count.
    starvation_steps: a token reused for more than this many steps is recomputed first.
    full_context: on Wan, recomputed tokens attend to the keys / values of every token (False: only to
        each other, which loses their attention context; kept to measure the difference). Image
        models always read every token's keys / values from their key/value cache.
    """

    method: ClassVar[str] = "region_adaptive"
    stage: ClassVar[Stage] = Stage.TOKENS
    incompatible: ClassVar[dict[str, str]] = {
        "motion_cache": _STATE_REASON.format(other="motion_cache", why="does the same with its own cache, and the "
                                             "two would gather/scatter the same block stack"),
        "token_merge": _STATE_REASON.format(other="token_merge", why="would merge within that changing subset"),
        "step_cache": _STATE_REASON.format(other="step_cache", why="would cache a whole-stack residual of other tokens"),
        "block_cache": _STATE_REASON.format(other="block_cache", why="would cache a middle residual of other tokens"),
    }
    compile_note: ClassVar[str] = (
        "the full/partial schedule is host-side Python (two paths, each traced once); K is a static function "
        "of the shape, and scoring/selection/gather/scatter are device ops: no dynamic shapes, no syncs"
    )

    recompute_ratio: float = 0.5
    warmup_steps: int = 4
    full_every: int = 5
    final_steps: int = 1
    starvation_steps: int = 4
    full_context: bool = True

    def __post_init__(self) -> None:
        require_recompute_ratio("region_adaptive", self.recompute_ratio)
        require_int("region_adaptive", "warmup_steps", self.warmup_steps, 2, "the score needs two model outputs")
        require_int("region_adaptive", "full_every", self.full_every, 2, "1 would compute every step in full")
        require_int("region_adaptive", "final_steps", self.final_steps, 0)
        require_int("region_adaptive", "starvation_steps", self.starvation_steps, 1, "steps a token may be reused")
        require_bool("region_adaptive", "full_context", self.full_context)


def _kind(model: nn.Module) -> str:
    kind = grid_kind(model)
    if kind is not None:
        return kind
    raise DiffspeedError(
        f"region_adaptive supports DiT / PixArt and Wan transformers; got {type(_unwrap(model)).__name__}, whose token "
        "grid it does not know"
    )


def output_change(out: torch.Tensor, prev: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """(B, N) expected change per token: mean ``|out - prev|`` over channels and the token's patch.

    ``out`` / ``prev``: (B, C, H, W) with ``patch = (p, p)`` or (B, C, F, H, W) with ``(pt, ph, pw)``;
    token order is that of the patch embedding (frame, row, column).
    """
    d = (out.detach().float() - prev.detach().float()).abs().mean(dim=1, keepdim=True)
    pool = F.avg_pool2d if d.dim() == 4 else F.avg_pool3d
    return pool(d, kernel_size=patch, stride=patch).flatten(1)


@register_method(RegionAdaptiveConfig)
def apply_region_adaptive(model: nn.Module, config: RegionAdaptiveConfig, adapter: ModelAdapter) -> MethodHandle:
    base = _unwrap(model)
    kind = _kind(base)  # clear error for unsupported models
    for other, reason in config.incompatible.items():
        if other in applied_methods(model):
            raise IncompatibleMethodsError(f"'region_adaptive' cannot be combined with {other!r}: {reason}")
    blocks = adapter.blocks(model)
    n_blocks = len(blocks)
    if kind == "image":
        p = int(base.config.patch_size)
        patch: tuple[int, ...] = (p, p)
    else:
        patch = _wan_patch_size(base)

    handle, ctx, key, stats = subset_handle(model, config, "region_adaptive")

    def partial_allowed(st: dict) -> bool:
        return partial_step_allowed(ctx, config, st, ("cache", "score"))

    def model_wrapper(inner: Any, *args: Any, **kwargs: Any) -> Any:
        st = ctx.state(key)
        latent = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
        ok = isinstance(latent, torch.Tensor) and latent.dim() == (4 if kind == "image" else 5)
        st["plan"] = {"partial": ok and partial_allowed(st), "latent": latent if ok else None, "started": False}
        try:
            out = inner(*args, **kwargs)
        finally:
            st.pop("plan", None)
        if ok:
            y = output_tensor(out)
            if y is not None and y.dim() == latent.dim() and y.shape[0] == latent.shape[0]:
                y = y[:, : latent.shape[1]].detach()  # DiT learned sigma: keep the noise channels
                prev = st.get("prev_out")
                if prev is not None and prev.shape == y.shape:
                    st["score"] = output_change(y, prev, patch)
                else:
                    st.pop("score", None)
                st["prev_out"] = y
        return out

    def select(st: dict, plan: dict, hidden: torch.Tensor, rotary: Any) -> bool:
        """Decide this call's reduced token set (device ops only); False = run in full."""
        cache = st.get("cache")
        b, n = hidden.shape[:2]
        if cache is None or cache["residual"].shape != hidden.shape:
            return False
        score = st.get("score")
        if score is None or score.shape != (b, n):
            return False
        mode = _rotary_mode(_WAN, rotary, b, n) if kind == "video" else ("none" if rotary is None else None)
        if mode is None:
            return False
        grid = _token_grid(base, plan["latent"].shape)
        if grid[0] * grid[1] * grid[2] != n:
            return False
        k = min(n, max(1, math.ceil(config.recompute_ratio * n)))
        score = score.nan_to_num(0.0, posinf=0.0, neginf=0.0)
        age_now = cache["age"] + 1  # steps since the token's residual was computed, if reused now
        stale = age_now > config.starvation_steps
        top = score.amax(dim=1, keepdim=True)
        prio = torch.where(stale, top + 1.0 + age_now.float(), score)  # starved first, oldest first
        idx = prio.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
        plan["idx"] = idx
        plan["rotary"] = _reduce_rotary(rotary, mode, idx)
        plan["k"] = k
        return True

    def cache_fields(old: Any, residual: torch.Tensor) -> dict:
        if old is not None and old["hits"].shape == residual.shape[:2]:
            return {"hits": old["hits"]}
        return {"hits": torch.zeros(residual.shape[:2], dtype=torch.int32, device=residual.device)}

    # video (Wan): the runner's full-context path; image models use the key/value cache below
    runner = TokenSubsetRunner(ctx, key, stats, n_blocks, _WAN if kind == "video" else None, select, cache_fields,
                               require_3d=True, full_context=kind == "video" and config.full_context)

    def kv_wrapper(name: str, inner: Any, *args: Any, **kwargs: Any) -> Any:
        """attn1.to_k / to_v (image models): keys/values of every token, reused ones from the cache."""
        out = inner(*args, **kwargs)
        st = ctx.state(key)
        plan = st.get("plan")
        if plan is None or not plan["started"] or not isinstance(out, torch.Tensor) or out.dim() != 3:
            return out
        kv = st.setdefault("kv", {})
        slot = (plan["block"], name)
        if not plan["partial"]:
            if out.shape == plan["h_in"].shape[:2] + out.shape[2:]:
                kv[slot] = out
            return out
        cached = kv.get(slot)
        idx = plan["idx"]
        if cached is None or cached.shape[:2] != plan["h_in"].shape[:2] or cached.shape[2] != out.shape[2] \
                or out.shape[1] != idx.shape[1]:
            return out  # no cache: the recomputed tokens attend to each other only
        cached.scatter_(1, idx.unsqueeze(-1).expand(-1, -1, out.shape[-1]), out.to(cached.dtype))
        return cached

    for i, (_, block, io) in enumerate(blocks):
        runner.wrap_block(handle, i, block, io)
        attn = getattr(block, "attn1", None)
        if kind == "image" and attn is not None:
            for name in ("to_k", "to_v"):
                proj = getattr(attn, name, None)
                if isinstance(proj, nn.Module):
                    kfn = lambda inner, *a, _n=name, **k: kv_wrapper(_n, inner, *a, **k)  # noqa: E731
                    handle.on_remove(wrap_forward(proj, kfn).remove)
    handle.on_remove(wrap_forward(base, model_wrapper).remove)
    return handle
