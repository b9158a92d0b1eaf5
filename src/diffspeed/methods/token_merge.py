"""Token merging for DiTs (after ToMe, Bolya et al. 2023, and ToMeSD, Bolya & Hoffman 2023).

Idea: many image/video tokens are nearly redundant (flat backgrounds, static regions). Bipartite soft
matching merges the ``r`` most redundant tokens into similar ones before the expensive part of a
block, the block runs on ``N - r`` tokens (real compute saved: attention is quadratic, the linear
layers linear in the token count), and the result is *unmerged* back to ``N`` tokens afterwards.

Design (what runs, per forward call of the transformer):

* **Destination set** (ToMeSD): the token grid ``(F', H', W')`` (images: ``F' = 1``) is cut into
  ``stride = (sy, sx)`` cells per frame; one token per cell, at a random offset, is a destination
  (``dst``); every other token is a source (``src``). The offsets come from a ``torch.Generator``
  seeded with ``seed`` at the start of every generation, so results are deterministic.
* **Matching, once per forward** (at the first block's input, shared by all blocks: cheaper than
  per-block matching and consistent through the stack). Similarity = cosine of the first block's
  input hidden states. Each src token picks its most similar dst token; the
  ``r = min(floor(ratio * N), #src, N - min_tokens)`` src tokens with the highest similarity are
  merged into their dst (the others stay). ``r`` is a static function of the shape, so argmax /
  argsort / gather / scatter all stay on the device: **no device-to-host sync**, static shapes.
  With ``reuse_steps = k`` the matching is recomputed only every ``k`` steps (per CFG branch) and
  the previous assignment is reused in between ("similarity reuse across adjacent steps").
* **Merge / unmerge at the block level** (``merge_attn`` and ``merge_mlp``, the default): at every
  block's input the sequence is reduced by size-weighted averaging (``assign`` maps each token to
  its slot in the reduced sequence; ``sizes`` counts the tokens per slot), the **whole block**
  (attention + MLP, cross-attention too) runs on ``N - r`` tokens, and each token gets its slot's
  block update on top of its own input::

      out_token = in_token + (out_slot - in_slot)       # computed as out_slot + (in_token - in_slot)

  so a token that was not merged gets the block output bit-exactly, and merged tokens share their
  dst's update while keeping their own residual stream. Self-attention uses ToMe's *proportional
  attention*: ``log(size)`` is added to the keys' logits (an additive ``attention_mask`` on
  ``attn1``), so a slot holding ``s`` identical tokens weighs exactly as the ``s`` tokens would:
  merging duplicate tokens changes nothing (tested).
* **Only one of merge_attn / merge_mlp**: ToMeSD style, merging wraps just that module
  (``attn1``, or ``ff`` / Wan's ``ffn``): its (normalised) input is merged, its output unmerged by
  copying the slot's output to every token of the slot.
* **Positions**: DiT / PixArt add their positional embedding before the blocks (nothing to do). Wan
  passes a per-token rotary table to every block: its rows are gathered per reduced slot (the dst
  token's / the kept token's own row), as are the rows of a per-token ``temb`` (Wan 2.2 TI2V).
* ``ratio = 0`` (or ``r = 0`` for a short sequence) runs the unmodified blocks: bit-identical.

Supported: DiT / PixArt (``BasicTransformerBlock``, grid ``(H/p, W/p)``) and Wan (grid
``(F/pt, H/ph, W/pw)``); other models are refused with an error naming the class.

``handle.stats``: ``tokens_merged`` (token-block computations removed: ``B * r`` per merged block
call), ``blocks_merged`` (block calls run on a reduced sequence), ``merge_ratio_effective``
(tokens_merged over all token-block computations seen), ``matchings_computed``, ``matchings_reused``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapters.base import BlockIO, ModelAdapter
from ..context import get_context
from ..errors import DiffspeedError, IncompatibleMethodsError
from ..hooks import wrap_forward
from ._validate import grid_kind, is_int as _is_int, unwrap as _unwrap
from .base import MethodConfig, MethodHandle, Stage, applied_methods, register_method
from .motion_cache import _gather_rows, _get_arg, _set_arg

_EPS = 1e-12


@dataclass(frozen=True)
class TokenMergeConfig(MethodConfig):
    """Merge redundant tokens before each block, unmerge after (ToMe / ToMeSD for DiTs).

    ratio: fraction of the tokens merged away, in [0, 1) (capped by the src set: with stride 2 at most
        3/4 of the tokens are sources). 0 = exact.
    stride: (sy, sx) cells of the token grid holding one destination token each (an int = both).
    merge_attn / merge_mlp: both (default): the whole block runs on the reduced sequence; only one:
        just that module does.
    reuse_steps: recompute the matching every N steps, reuse the previous assignment in between.
    min_tokens: the reduced sequence keeps at least this many tokens (shorter sequences are not merged).
    seed: seed of the random destination offsets (reset at every generation).
    """

    method: ClassVar[str] = "token_merge"
    stage: ClassVar[Stage] = Stage.TOKENS
    incompatible: ClassVar[dict[str, str]] = {
        "motion_cache": (
            "motion_cache already runs the blocks on a gathered subset of tokens; token_merge would have to "
            "merge within that changing subset; use one of them"
        ),
    }
    compile_note: ClassVar[str] = ""

    ratio: float = 0.5
    stride: int | tuple[int, int] = 2
    merge_attn: bool = True
    merge_mlp: bool = True
    reuse_steps: int = 1
    min_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        r = self.ratio
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not math.isfinite(r) or not 0 <= r < 1:
            raise DiffspeedError(
                f"token_merge ratio must be in [0, 1) (fraction of tokens merged away, e.g. 0.5; 0 = exact), got {r!r}"
            )
        s = self.stride
        pair = (s, s) if _is_int(s) else s
        if not (isinstance(pair, tuple) and len(pair) == 2 and all(_is_int(v) and v >= 1 for v in pair)):
            raise DiffspeedError(
                f"token_merge stride must be an integer >= 1 or a pair (sy, sx) of them (e.g. 2 or (2, 2)), got {s!r}"
            )
        if pair[0] * pair[1] < 2:
            raise DiffspeedError(
                "token_merge stride (1, 1) makes every token a destination, so nothing can merge; use stride >= 2"
            )
        for name in ("merge_attn", "merge_mlp"):
            if not isinstance(getattr(self, name), bool):
                raise DiffspeedError(f"token_merge {name} must be true or false, got {getattr(self, name)!r}")
        if not (self.merge_attn or self.merge_mlp):
            raise DiffspeedError(
                "token_merge with merge_attn=False and merge_mlp=False merges nothing; set one of them to true "
                "(or do not apply token_merge)"
            )
        if not _is_int(self.reuse_steps) or self.reuse_steps < 1:
            raise DiffspeedError(
                "token_merge reuse_steps must be an integer >= 1 (1 = recompute the matching every step), "
                f"got {self.reuse_steps!r}"
            )
        if not _is_int(self.min_tokens) or self.min_tokens < 1:
            raise DiffspeedError(
                f"token_merge min_tokens must be an integer >= 1 (tokens kept at least), got {self.min_tokens!r}"
            )
        if not _is_int(self.seed):
            raise DiffspeedError(f"token_merge seed must be an integer, got {self.seed!r}")

    @property
    def stride_pair(self) -> tuple[int, int]:
        s = self.stride
        return (s, s) if _is_int(s) else (int(s[0]), int(s[1]))


# ---- model families -----------------------------------------------------------------------------
def _kind(model: nn.Module) -> str:
    kind = grid_kind(model)
    if kind is not None:
        return kind
    raise DiffspeedError(
        f"token_merge supports DiT / PixArt (BasicTransformerBlock) and Wan transformers; got "
        f"{type(_unwrap(model)).__name__}, whose token grid and block layout it does not know"
    )


def token_grid(model: nn.Module, latent_shape: tuple[int, ...] | torch.Size) -> tuple[int, int, int]:
    """The token grid (F', H', W') of a transformer input of ``latent_shape`` (images: F' = 1).

    DiT / PixArt: latent (B, C, H, W), tokens (H/p) * (W/p); Wan: latent (B, C, F, H, W), tokens
    (F/pt) * (H/ph) * (W/pw). Raises :class:`DiffspeedError` naming the class for other models.
    """
    base = _unwrap(model)
    kind = _kind(base)
    cfg = base.config
    if kind == "image":
        if len(latent_shape) != 4:
            raise DiffspeedError(f"token_merge expects a 4-D image latent for {type(base).__name__}, got shape "
                                 f"{tuple(latent_shape)}")
        p = int(cfg.patch_size)
        return 1, int(latent_shape[2]) // p, int(latent_shape[3]) // p
    if len(latent_shape) != 5:
        raise DiffspeedError(f"token_merge expects a 5-D video latent for {type(base).__name__}, got shape "
                             f"{tuple(latent_shape)}")
    pt, ph, pw = (int(v) for v in cfg.patch_size)
    return int(latent_shape[2]) // pt, int(latent_shape[3]) // ph, int(latent_shape[4]) // pw


def merge_count(n: int, n_src: int, ratio: float, min_tokens: int) -> int:
    """Tokens merged away: ``min(floor(ratio * n), n_src, n - min_tokens)``, at least 0 (static int)."""
    return max(0, min(int(math.floor(ratio * n)), n_src, n - min_tokens))


def dst_indices(grid: tuple[int, int, int], stride: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Destination token indices (CPU, sorted): one per ``stride`` cell of every frame, at a random offset."""
    f, h, w = grid
    sy, sx = stride
    hc, wc = h // sy, w // sx
    if f * hc * wc == 0:
        return torch.zeros(0, dtype=torch.long)
    off = torch.randint(sy * sx, (f, hc, wc), generator=generator)
    rows = torch.arange(hc).view(1, hc, 1) * sy + off // sx
    cols = torch.arange(wc).view(1, 1, wc) * sx + off % sx
    frames = torch.arange(f).view(f, 1, 1)
    return (frames * h * w + rows * w + cols).flatten().sort().values


def bipartite_match(metric: torch.Tensor, dst_idx: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bipartite soft matching on ``metric`` (B, N, C) with destination tokens ``dst_idx`` (device).

    Returns ``kept`` (B, N - r): the tokens that stay, in original order (slot j holds token kept[:, j]
    and whatever merged into it); ``assign`` (B, N): the slot of every token; ``sizes`` (B, N - r):
    tokens per slot (float32). Device ops only.
    """
    b, n, _ = metric.shape
    dev = metric.device
    is_dst = torch.zeros(n, dtype=torch.bool, device=dev)
    is_dst[dst_idx] = True
    # the src tokens, in order (no nonzero(): it syncs on accelerators; the count n - #dst is known)
    src_idx = (is_dst.long() * n + torch.arange(n, device=dev)).argsort()[: n - dst_idx.numel()]
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    scores = m[:, src_idx] @ m[:, dst_idx].transpose(1, 2)  # (B, Ns, Nd)
    node_max, node_idx = scores.max(dim=-1)
    order = node_max.argsort(dim=-1, descending=True, stable=True)
    merged_src = order[:, :r]  # positions in the src list
    merged_tok = src_idx[merged_src]  # (B, r) token indices
    merged_dst = dst_idx[node_idx.gather(1, merged_src)]  # (B, r) their destination tokens
    ar = torch.arange(n, device=dev).expand(b, n)
    merged_mask = torch.zeros(b, n, dtype=torch.long, device=dev).scatter_(1, merged_tok, 1)
    kept = (merged_mask * n + ar).argsort(dim=1)[:, : n - r]
    pos = torch.zeros(b, n, dtype=torch.long, device=dev)
    pos.scatter_(1, kept, torch.arange(n - r, device=dev).expand(b, n - r).contiguous())
    target = ar.clone().scatter_(1, merged_tok, merged_dst)  # each token's representative
    assign = pos.gather(1, target)
    sizes = torch.zeros(b, n - r, device=dev).scatter_add_(1, assign, torch.ones(b, n, device=dev))
    return kept, assign, sizes


def merge_tokens(x: torch.Tensor, assign: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, N - r, D): size-weighted average of the tokens of each slot."""
    b, _, d = x.shape
    idx = assign.unsqueeze(-1).expand(-1, -1, d)
    sums = x.new_zeros(b, sizes.shape[1], d).scatter_add_(1, idx, x)
    return sums / sizes.unsqueeze(-1).to(x.dtype)


def unmerge_residual(x: torch.Tensor, x_small: torch.Tensor, out_small: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Every token: its slot's output plus its own offset from the slot's input (``x + out_slot - in_slot``)."""
    idx = assign.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return out_small.gather(1, idx) + (x - x_small.gather(1, idx))


def unmerge_copy(out_small: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Every token gets its slot's output (ToMe's unmerge)."""
    return out_small.gather(1, assign.unsqueeze(-1).expand(-1, -1, out_small.shape[-1]))


def _rotary_rows(rotary: Any, batch: int, n: int) -> bool:
    parts = rotary if isinstance(rotary, (tuple, list)) else (rotary,)
    return all(isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[0] in (1, batch) and t.shape[1] == n
               for t in parts)


def _gather_rotary(rotary: Any, kept: torch.Tensor) -> Any:
    if isinstance(rotary, (tuple, list)):
        return type(rotary)(_gather_rows(t, kept) for t in rotary)
    return _gather_rows(rotary, kept)


_ROTARY = (3, "rotary_emb")  # Wan block(hidden, encoder, temb, rotary_emb)
_TEMB = (2, "temb")


def _attn_with_bias(args: tuple, kwargs: dict, bias: torch.Tensor) -> tuple[tuple, dict]:
    """Pass ``bias`` as attn1's additive ``attention_mask`` (positional arg 2 or keyword) if none is set."""
    if len(args) > 2:
        if args[2] is None:
            args = args[:2] + (bias,) + args[3:]
        return args, kwargs
    if kwargs.get("attention_mask") is None:
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = bias
    return args, kwargs


@register_method(TokenMergeConfig)
def apply_token_merge(model: nn.Module, config: TokenMergeConfig, adapter: ModelAdapter) -> MethodHandle:
    base = _unwrap(model)
    kind = _kind(base)  # clear error for unsupported models
    for other, reason in config.incompatible.items():
        if other in applied_methods(model):
            raise IncompatibleMethodsError(f"'token_merge' cannot be combined with {other!r}: {reason}")
    blocks = adapter.blocks(model)
    n_blocks = len(blocks)
    block_level = config.merge_attn and config.merge_mlp
    stride = config.stride_pair

    handle = MethodHandle(model, config)
    ctx = get_context(model)
    key = f"token_merge@{id(handle)}"
    handle.state_key = key  # type: ignore[attr-defined]
    stats = handle.stats
    stats.update({"tokens_merged": 0, "blocks_merged": 0, "merge_ratio_effective": 0.0,
                  "matchings_computed": 0, "matchings_reused": 0})
    totals = {"tokens": 0}

    def model_wrapper(inner: Any, *args: Any, **kwargs: Any) -> Any:
        st = ctx.state(key)
        latent = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
        st["plan"] = {"latent_shape": tuple(latent.shape) if isinstance(latent, torch.Tensor) else None,
                      "started": False, "active": False}
        try:
            return inner(*args, **kwargs)
        finally:
            st.pop("plan", None)

    def matching(st: dict, plan: dict, hidden: torch.Tensor) -> dict | None:
        """This forward's merge (reused from an earlier step when allowed), or None to run in full."""
        shape = plan["latent_shape"]
        if shape is None or hidden.dim() != 3:
            return None
        b, n, _ = hidden.shape
        try:
            grid = token_grid(base, shape)
        except DiffspeedError:
            return None
        if grid[0] * grid[1] * grid[2] != n or shape[0] != b:
            return None
        old = st.get("match")
        step = ctx.step_index
        if old is not None and old["shape"] == (b, n) and old["device"] == hidden.device and 0 <= step - old["step"] < config.reuse_steps:
            stats["matchings_reused"] += 1
            return old
        gen = st.get("rng")
        if gen is None:
            gen = st["rng"] = torch.Generator().manual_seed(config.seed)
        dst = dst_indices(grid, stride, gen)
        r = merge_count(n, n - dst.numel(), config.ratio, config.min_tokens)
        if r == 0:
            st.pop("match", None)
            return None
        kept, assign, sizes = bipartite_match(hidden.detach(), dst.to(hidden.device), r)
        bias = sizes.log().to(hidden.dtype)[:, None, :]  # (B, 1, N'): broadcasts over heads and queries
        if kind == "video":
            bias = bias[:, None]  # (B, 1, 1, N') for Wan's attention dispatch
        match = {"shape": (b, n), "device": hidden.device, "step": step, "r": r, "kept": kept,
                 "assign": assign, "sizes": sizes, "bias": bias}
        st["match"] = match
        stats["matchings_computed"] += 1
        return match

    def count(b: int, n: int, r: int) -> None:
        totals["tokens"] += b * n
        if r:
            stats["tokens_merged"] += b * r
            stats["blocks_merged"] += 1
        stats["merge_ratio_effective"] = stats["tokens_merged"] / totals["tokens"] if totals["tokens"] else 0.0

    def block_wrapper(i: int, io: BlockIO, inner: Any, *args: Any, **kwargs: Any) -> Any:
        st = ctx.state(key)
        plan = st.get("plan")
        if plan is None or (i > 0 and not plan["started"]):
            return inner(*args, **kwargs)  # a block called outside a model forward: untouched
        hidden, _ = io.get_states(args, kwargs)
        if i == 0:
            plan["started"] = True
            plan["match"] = matching(st, plan, hidden)
            plan["rotary"] = None
            plan["temb"] = None
        match = plan["match"]
        b, n = hidden.shape[0], hidden.shape[1] if hidden.dim() == 3 else 0
        if match is None or match["shape"] != (b, n):
            count(b, n, 0)
            out = inner(*args, **kwargs)
        else:
            count(b, n, match["r"])
            plan["active"] = True
            plan["cur"] = match
            try:
                if kind == "video":
                    rotary = _get_arg(args, kwargs, _ROTARY)
                    if rotary is not None and _rotary_rows(rotary, b, n):
                        if plan["rotary"] is None:
                            plan["rotary"] = _gather_rotary(rotary, match["kept"])
                        if block_level:
                            args, kwargs = _set_arg(args, kwargs, _ROTARY, plan["rotary"])
                    temb = _get_arg(args, kwargs, _TEMB)
                    if block_level and isinstance(temb, torch.Tensor) and temb.dim() == 4 and temb.shape[1] == n:
                        if plan["temb"] is None:  # Wan 2.2 TI2V: per-token modulation (B, N, 6, D)
                            plan["temb"] = _gather_rows(temb, match["kept"])
                        args, kwargs = _set_arg(args, kwargs, _TEMB, plan["temb"])
                if block_level:
                    small = merge_tokens(hidden, match["assign"], match["sizes"])
                    args, kwargs = _set_arg(args, kwargs, (0, io.hidden_arg), small)
                    out = inner(*args, **kwargs)
                    h_small, encoder = io.split_output(out)
                    out = io.make_output(unmerge_residual(hidden, small, h_small, match["assign"]), encoder)
                else:
                    out = inner(*args, **kwargs)
            finally:
                plan["active"] = False
        if i == n_blocks - 1:
            plan["started"] = False
        return out

    def attn_wrapper(inner: Any, *args: Any, **kwargs: Any) -> Any:
        """attn1: proportional attention on a merged sequence; merges itself when only merge_attn."""
        st = ctx.state(key)
        plan = st.get("plan")
        if plan is None or not plan["active"]:
            return inner(*args, **kwargs)
        match = plan["cur"]
        if block_level:
            args, kwargs = _attn_with_bias(args, kwargs, match["bias"])
            return inner(*args, **kwargs)
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        small = merge_tokens(x, match["assign"], match["sizes"])
        args, kwargs = _set_arg(args, kwargs, (0, "hidden_states"), small)
        if kind == "video" and plan["rotary"] is not None:
            args, kwargs = _set_arg(args, kwargs, _ROTARY, plan["rotary"])
        args, kwargs = _attn_with_bias(args, kwargs, match["bias"])
        return unmerge_copy(inner(*args, **kwargs), match["assign"])

    def mlp_wrapper(inner: Any, *args: Any, **kwargs: Any) -> Any:
        st = ctx.state(key)
        plan = st.get("plan")
        if plan is None or not plan["active"]:
            return inner(*args, **kwargs)
        match = plan["cur"]
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        small = merge_tokens(x, match["assign"], match["sizes"])
        args, kwargs = _set_arg(args, kwargs, (0, "hidden_states"), small)
        return unmerge_copy(inner(*args, **kwargs), match["assign"])

    for i, (fqn, block, io) in enumerate(blocks):
        attn = getattr(block, "attn1", None)
        mlp = getattr(block, "ff", None) if kind == "image" else getattr(block, "ffn", None)
        if attn is None or mlp is None:
            raise DiffspeedError(f"token_merge: block {fqn} ({type(block).__name__}) has no attn1/feed-forward module")
        fn = lambda inner, *a, _i=i, _io=io, **k: block_wrapper(_i, _io, inner, *a, **k)  # noqa: E731
        handle.on_remove(wrap_forward(block, fn).remove)
        if block_level or config.merge_attn:
            handle.on_remove(wrap_forward(attn, attn_wrapper).remove)
        if not block_level and config.merge_mlp:
            handle.on_remove(wrap_forward(mlp, mlp_wrapper).remove)
    handle.on_remove(wrap_forward(base, model_wrapper).remove)
    return handle
