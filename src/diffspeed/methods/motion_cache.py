"""Token-level reuse by motion for video DiTs (after "MotionCache", 2025), with sync-free decisions.

Idea: in a video DiT the tokens of static regions change little from one denoising step to the
next, while the tokens of moving regions change a lot. So, per token, the block stack's output is
recomputed often where there is motion and reused where there is none.

Design (what runs, per forward call of the transformer):

* **Full steps** run the block stack on every token, as the unmodified model does, and refresh the
  per-token cache: the block-stack residual ``r = h_out - h_in`` of every video token (``h_in`` =
  the hidden states entering the first block, ``h_out`` = those leaving the last one). The first
  ``warmup_steps``, the last ``final_steps`` and every ``full_every``-th step (at most
  ``full_every - 1`` partial steps in a row) are full.
* **Partial steps** run the *whole block stack on a reduced token set*: ``K = ceil(recompute_ratio *
  N)`` video tokens per sample, gathered at the first block's input. Their positional information is
  kept: Wan computes its rotary table from the full grid inside the model's forward, so the matching
  rows of ``rotary_emb`` (and of the per-token ``temb`` of Wan 2.2 TI2V) are gathered at every
  block call; CogVideoX adds its sin-cos positions before the blocks (nothing to do) or passes a
  rotary table (gathered too). After the last block the full sequence is rebuilt: recomputed tokens
  take their new output, every other token gets ``h_in + cached residual`` (its current input plus
  the residual cached when it was last computed), and the cache is updated for the recomputed
  tokens. The patch embedding and the output head always run on all tokens, so the current latents
  and timestep are honoured everywhere. CogVideoX's text tokens (its blocks' ``encoder_hidden_states``)
  are always computed in full; only video tokens are reduced.
* **Idle steps** (``idle_steps=m``, default 0): before each partial step, ``m`` steps on which no
  token is due: no block runs, every token gets its current input plus its cached residual (the
  paper's per-token update frequencies taken to the step where none is due). The recomputed
  (moving) tokens are then updated every ``m + 1`` steps and the static ones on full steps, so a
  cycle ``full, (idle x m, partial) x (full_every - 1)`` costs one full step plus ``full_every - 1``
  partial ones. Ages grow on idle steps too: raise ``max_age`` with ``idle_steps`` (the benchmark
  uses ``4 (m + 1)``), or the stale-first rule spends the partial steps on static tokens.
* **Full-context attention** (``full_context=True``, the default): the recomputed tokens'
  self-attention queries attend to keys / values of *every* token. Each block's self-attention input
  (the normalised, modulated hidden states) is cached per token on full steps; on a partial step
  the recomputed rows are scattered into it (so it holds each token's latest value) and K / V are
  projected from all of it. Cost: the K and V projections of the reused tokens, and attention
  ``K x N`` instead of ``K x K``; on reference-video a partial step at ratio 0.2 costs 31.5% of a
  full step's block FLOPs (20% with subset-only attention). Memory: one (B, N, D) tensor per
  block and CFG branch.
* **The approximation**: reused tokens get a stale residual on top of their current input, and
  the keys / values of reused tokens come from the step they were last computed. Both errors are
  zero when the reused tokens really are static.

  For CogVideoX the joint text/video attention is rewritten the same way (text tokens attend to,
  and are attended by, every video token). With a non-stock attention processor (e.g. another
  method's) the subset-only attention below is used.

  Without full-context attention (``full_context=False``) the recomputed tokens attend only to each
  other (and, for CogVideoX, to the text tokens): at ratio 0.5 half of every recomputed token's
  attention context vanishes on a partial step, so *their own* outputs are wrong, not just the
  reused ones. On the trained reference-video model (50 steps, CFG 4) that cost 17.4 dB PSNR vs
  the full model at ratio 0.5 (35% of token-blocks skipped); with full-context attention the same
  setting gives 35.1 dB.
  Early steps are the least reuse-tolerant: hence the longer warm-up of the defaults.
  ``recompute_ratio=1.0`` recomputes every token through the same gather/scatter path and is
  bit-identical to the unmodified model (tested).

Which tokens are recomputed. A score per token::

    score = motion_weight * motion + change

* ``motion``: mean ``|x[f] - x[f-1]|`` of the transformer's *input latent* over the token's patch
  (frame difference; the first frame uses the next frame), normalised per sample to mean 1. The
  latent is read from the top-level forward call (a wrapper on the model's forward), and the token
  grid ``(F', H', W')`` comes from the latent's shape and the config's patch sizes
  (:func:`token_grid`).
* ``change``: per token, the relative L1 change of its block-stack residual the last time it was
  computed (vs. the residual cached before), normalised per sample to mean 1: a lagged estimate of
  how fast that token is changing. It stays on the device.

The ``K`` tokens with the highest priority are recomputed, where tokens whose cached residual would
be older than ``max_age`` steps come first (oldest first), then the others by score. ``K`` is a
fixed function of the shape, so selection (``topk``), gather and scatter all stay on the device:
the hot path has no device-to-host sync, and under ``torch.compile`` the shapes are static. The
price: if more tokens are stale than ``K`` holds, the rest wait a step; with ``full_every - 1 <=
max_age`` (the defaults: 4 and 3) no token's age can exceed ``max_age`` at all, since a full step
refreshes every token.

Per-sample selection: each row of the batch (batched CFG included) chooses its own tokens. With a
CogVideoX rotary table (shape ``(N, d)``, shared by the batch) the rows share one selection (the
mean priority across rows) because the attention processor cannot take a per-row table.

State is per CFG branch (:meth:`~diffspeed.context.StepContext.state`); separate cond / uncond
forwards keep separate caches. ``handle.stats``: ``full_steps``, ``partial_steps``, ``idle_steps`` (forward
calls), ``tokens_recomputed`` (token rows run through the block stack, full steps included),
``tokens_reused`` and ``skipped_fraction`` (share of token-block computations skipped over the
generation; it counts token rows, so with full-context attention the FLOPs saved are somewhat less,
see above). ``handle.state_key`` names the per-branch state; its ``"cache"`` holds ``hits``, the
number of partial steps each token was recomputed in (tests and analysis).
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
from ..hooks import wrap_forward
from ._validate import is_number as _is_number, require_int, require_recompute_ratio, unwrap as _unwrap
from .base import MethodConfig, MethodHandle, Stage, applied_methods, register_method
from .token_subset import (  # noqa: F401  (re-exported: token_merge imports the argument helpers from here)
    partial_step_allowed,
    subset_handle,
    _COGVIDEOX,
    _WAN,
    TokenSubsetRunner,
    _Family,
    _gather_rows,
    _get_arg,
    _reduce_rotary,
    _rotary_mode,
    _set_arg,
)

_EPS = 1e-12


@dataclass(frozen=True)
class MotionCacheConfig(MethodConfig):
    """Recompute moving tokens, reuse the cached block-stack residual of static ones (video DiTs).

    recompute_ratio: fraction of video tokens run through the blocks on a partial step (the rest
        reuse their cached residual); 1.0 = all (exact).
    motion_weight: weight of the latent frame-difference term against the residual-change term
        (0 = residual change only).
    warmup_steps: the first steps are computed in full.
    full_every: at most ``full_every - 1`` partial steps in a row; the next one is full and
        refreshes every token's cache.
    max_age: a token whose cached residual would be older than this many steps is recomputed first.
    final_steps: the last steps are computed in full; needs a known step count.
    full_context: recomputed tokens attend to keys / values of every token (each block's
        cached self-attention input, refreshed for the recomputed rows), not only to each other.
        False = the old subset-only attention (much lower fidelity; kept for comparison).
    idle_steps: steps before each partial step on which no token is due: every token reuses its
        cached residual and no block runs. So the recomputed (moving) tokens are updated every
        ``idle_steps + 1`` steps and the static ones only on full steps. 0 = a partial step
        follows every step (the original schedule).
    """

    method: ClassVar[str] = "motion_cache"
    stage: ClassVar[Stage] = Stage.TOKENS
    incompatible: ClassVar[dict[str, str]] = {
        "step_cache": (
            "motion_cache runs the blocks on a changing subset of tokens on partial steps, so a whole-stack "
            "residual cached by step_cache would belong to other tokens; use one of them"
        ),
        "block_cache": (
            "motion_cache runs the blocks on a changing subset of tokens on partial steps, so block_cache's "
            "cached middle residual would belong to other tokens; use one of them"
        ),
    }
    compile_note: ClassVar[str] = (
        "the full/partial schedule is host-side Python (two paths, each traced once); the reduced token "
        "count is a static function of the shape, and selection/gather/scatter are device ops, so no "
        "dynamic shapes and no syncs"
    )

    # defaults measured on reference-video (50 steps, CFG 4, 2 clips): 36.5 dB PSNR vs the full model
    # with 53% of token-blocks skipped (ratio 0.25 / warm-up 3: 33.0 dB at 52%; warm-up 8: 38.6 dB at 50%)
    recompute_ratio: float = 0.2
    motion_weight: float = 1.0
    warmup_steps: int = 6
    full_every: int = 4
    max_age: int = 3
    final_steps: int = 1
    full_context: bool = True
    idle_steps: int = 0

    def __post_init__(self) -> None:
        require_recompute_ratio("motion_cache", self.recompute_ratio)
        require_int("motion_cache", "idle_steps", self.idle_steps, 0, "0 = no idle steps")
        if not _is_number(self.motion_weight) or self.motion_weight < 0:
            raise DiffspeedError(
                "motion_cache motion_weight must be a finite number >= 0 (0 = rank tokens by residual change only), "
                f"got {self.motion_weight!r}"
            )
        require_int("motion_cache", "warmup_steps", self.warmup_steps, 1, "the first step has nothing to reuse")
        require_int("motion_cache", "full_every", self.full_every, 2, "1 would compute every step in full")
        require_int("motion_cache", "max_age", self.max_age, 1, "steps a cached token may be reused")
        require_int("motion_cache", "final_steps", self.final_steps, 0)


# ---- model families (defined in .token_subset) ---------------------------------------------------
_FAMILIES = {"WanTransformer3DModel": _WAN, "CogVideoXTransformer3DModel": _COGVIDEOX}


def _family(model: nn.Module) -> _Family:
    base = _unwrap(model)
    for klass in type(base).__mro__:
        fam = _FAMILIES.get(klass.__name__)
        if fam is not None:
            return fam
    raise DiffspeedError(f"motion_cache needs a video model (Wan/CogVideoX); got {type(base).__name__}")


def patch_size(model: nn.Module) -> tuple[int, int, int]:
    """The (pt, ph, pw) patch of a Wan / CogVideoX transformer (latent units)."""
    base = _unwrap(model)
    fam = _family(base)
    cfg = base.config
    if fam is _WAN:
        pt, ph, pw = (int(p) for p in cfg.patch_size)
        return pt, ph, pw
    p = int(cfg.patch_size)
    return int(cfg.patch_size_t or 1), p, p


def token_grid(model: nn.Module, latent_shape: tuple[int, ...] | torch.Size) -> tuple[int, int, int]:
    """The video token grid (F', H', W') for a transformer input of ``latent_shape``.

    ``latent_shape`` is the shape of the model's own ``hidden_states`` input: (B, C, F, H, W) for
    Wan, (B, F, C, H, W) for CogVideoX. Tokens are ordered frame-major, then row, then column in
    both families. Raises :class:`DiffspeedError` naming the class for non-video models.
    """
    fam = _family(model)
    if len(latent_shape) != 5:
        raise DiffspeedError(f"motion_cache expects a 5-D video latent, got shape {tuple(latent_shape)}")
    pt, ph, pw = patch_size(model)
    if fam.latent_layout == "cfhw":
        _, _, f, h, w = latent_shape
    else:
        _, f, _, h, w = latent_shape
    return int(f) // pt, int(h) // ph, int(w) // pw


def frame_motion(latent: torch.Tensor, layout: str, patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, N) per-token motion: mean |x[f] - x[f-1]| over the token's patch, normalised to mean 1 per sample.

    The first frame uses the difference to the next frame; a single-frame latent has no motion (zeros).
    """
    x = latent.detach().float()
    if layout == "fchw":
        x = x.transpose(1, 2)  # -> (B, C, F, H, W)
    b, _, frames, _, _ = x.shape
    if frames < 2:
        pt, ph, pw = patch
        n = (frames // pt) * (x.shape[3] // ph) * (x.shape[4] // pw)
        return x.new_zeros(b, n)
    d = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=1, keepdim=True)  # (B, 1, F-1, H, W)
    d = torch.cat([d[:, :, :1], d], dim=2)  # frame 0 uses frame 1's difference
    m = F.avg_pool3d(d, kernel_size=patch, stride=patch).flatten(1)  # (B, F'*H'*W')
    return m / m.mean(dim=1, keepdim=True).clamp_min(_EPS)


def _rel_change(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per-token relative L1 change (B, T, D) -> (B, T), float32."""
    new, old = new.float(), old.float()
    return (new - old).abs().mean(dim=-1) / old.abs().mean(dim=-1).clamp_min(_EPS)


@register_method(MotionCacheConfig)
def apply_motion_cache(model: nn.Module, config: MotionCacheConfig, adapter: ModelAdapter) -> MethodHandle:
    base = _unwrap(model)
    fam = _family(base)  # clear error for image models
    for other, reason in config.incompatible.items():
        if other in applied_methods(model):
            raise IncompatibleMethodsError(f"'motion_cache' cannot be combined with {other!r}: {reason}")
    blocks = adapter.blocks(model)
    n_blocks = len(blocks)
    patch = patch_size(base)

    handle, ctx, key, stats = subset_handle(model, config, "motion_cache")

    def partial_allowed(st: dict) -> bool:
        return partial_step_allowed(ctx, config, st, ("cache",))

    def model_wrapper(inner: Any, *args: Any, **kwargs: Any) -> Any:
        st = ctx.state(key)
        latent = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
        ok = isinstance(latent, torch.Tensor) and latent.dim() == 5
        partial = ok and partial_allowed(st)
        run = st.get("idle_run", 0)
        idle = partial and run < config.idle_steps  # no token is due yet: every token reuses its residual
        st["idle_run"] = run + 1 if idle else 0
        st["plan"] = {"partial": partial, "idle": idle, "latent": latent if ok else None, "started": False}
        try:
            return inner(*args, **kwargs)
        finally:
            st.pop("plan", None)

    def select(st: dict, plan: dict, hidden: torch.Tensor, rotary: Any) -> bool:
        """Decide this call's reduced token set (device ops only); False = run in full."""
        cache = st.get("cache")
        b, n = hidden.shape[:2]
        if cache is None or cache["residual"].shape != hidden.shape:
            return False
        mode = _rotary_mode(fam, rotary, b, n)
        if mode is None:
            return False
        latent = plan["latent"]
        grid = token_grid(base, latent.shape)
        if latent.shape[0] != b or grid[0] * grid[1] * grid[2] != n:
            return False
        k = min(n, max(1, math.ceil(config.recompute_ratio * n)))
        score = cache["change"] / cache["change"].mean(dim=1, keepdim=True).clamp_min(_EPS)
        if config.motion_weight > 0:
            score = score + config.motion_weight * frame_motion(latent, fam.latent_layout, patch)
        score = score.nan_to_num(0.0, posinf=0.0, neginf=0.0)
        age_now = cache["age"] + 1  # steps since the token's residual was computed, if reused now
        stale = age_now > config.max_age
        top = score.amax(dim=1, keepdim=True)
        prio = torch.where(stale, top + 1.0 + age_now.float(), score)  # stale first, oldest first
        if mode == "shared":
            prio = prio.mean(dim=0, keepdim=True)
        idx = prio.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
        if mode == "shared":
            idx = idx.expand(b, k)
        plan["idx"] = idx
        plan["rotary"] = _reduce_rotary(rotary, mode, idx)
        plan["k"] = k
        return True

    def cache_fields(old: Any, residual: torch.Tensor) -> dict:
        if old is not None and old["residual"].shape == residual.shape:
            return {"change": _rel_change(residual, old["residual"]), "hits": old["hits"]}
        return {
            "change": residual.new_zeros(residual.shape[:2], dtype=torch.float32),
            "hits": torch.zeros(residual.shape[:2], dtype=torch.int32, device=residual.device),
        }

    def on_partial_residual(cache: dict, res: torch.Tensor, new_res: torch.Tensor, idx_d: torch.Tensor,
                            idx: torch.Tensor) -> None:
        cache["change"].scatter_(1, idx, _rel_change(new_res, res.gather(1, idx_d)))

    runner = TokenSubsetRunner(ctx, key, stats, n_blocks, fam, select, cache_fields, on_partial_residual,
                              full_context=config.full_context)
    for i, (_, block, io) in enumerate(blocks):
        runner.wrap_block(handle, i, block, io)
    handle.on_remove(wrap_forward(base, model_wrapper).remove)
    return handle
