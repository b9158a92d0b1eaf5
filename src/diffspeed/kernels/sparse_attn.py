"""S2O-style block-sparse attention: importance-ordered key blocks, early stop, global-local pattern.

All functions take ``q, k, v`` of shape ``(B, H, N, D)`` (SDPA layout) and self-attention
(``N_q == N_k``). The sequence is cut into blocks of ``block_size`` tokens; a last partial block
is padded and its padded keys are masked with ``-inf`` (padded query rows are dropped).

**Importance estimate.** For query block ``i`` and key block ``j``::

    est[i, j] = scale * mean_q(block i) . mean_k(block j)

and the estimated (unnormalised) softmax mass of key block ``j`` is ``n_j * exp(est[i, j])``,
``n_j`` its number of real keys. Mean pooling is a heuristic, not a bound: when a block's keys are
spread, the pooled score under-estimates its real mass.

**Forced blocks (global-local pattern).** Key blocks with ``|i - j| <= local_window`` and the key
blocks holding the first ``global_tokens`` tokens are always computed (and computed first).

**Reference path** (:func:`block_sparse_attention`). Per query block, the forced blocks and then
the others in decreasing ``est`` are folded into an online-softmax accumulator (fp32). After each
block, the estimated mass of the blocks not yet computed, taken relative to the row's current
running max ``m`` and normaliser ``l``::

    ratio_row = sum_{j remaining} n_j * exp(est[i, j] - m_row) / l_row

is compared with ``threshold``; the query block stops when the largest ``ratio_row`` over its rows
is below it (forced blocks are never skipped). ``threshold=0`` computes every block and equals
dense SDPA to fp32 rounding. The loop runs over ranking positions (at most ``N / block_size``
steps) and is vectorised over batch, heads and query blocks; it checks once per step whether any
block is still active (a host sync: this path is a CPU/correctness reference).

**Flex path** (:func:`flex_block_sparse_attention`). The selection is made up front from the
estimates alone (no running statistics exist before the kernel runs): per query block, the
smallest set of top-ranked key blocks whose estimated mass share reaches ``1 - threshold``, plus
the forced blocks (:func:`block_selection`). That selection becomes a FlexAttention ``BlockMask``
of full blocks. On CUDA the compiled flex kernel skips the dropped blocks; elsewhere flex's eager
fallback materialises the scores (correct, not fast).

**Remainder compensation** (opt-in, ``compensate=True`` on both paths). S2O's stop rule already
*estimates* the mass of the key blocks it skips (``n_j * exp(est)``); dropping them throws that
estimate away and biases every row towards the computed blocks. With ``compensate`` the skipped
blocks are instead added through their pooled representatives, per query *token* ``x`` (not per
query block)::

    numerator   += sum_{j skipped} n_j * exp(scale * q_x . mean_k_j) * mean_v_j
    denominator += sum_{j skipped} n_j * exp(scale * q_x . mean_k_j)

(``n_j`` = real keys of block ``j``, ``mean_v_j`` = mean of ``v`` over them.) This is exact when a
block's keys are all equal (then ``sum_x' exp(q . k_x') v_x' = n_j exp(q . mean_k_j) mean_v_j`` for
any ``v``) and a first-order (Jensen: under-estimating) approximation when they are spread.
Caveat: on q/k/v captured from the reference video model (post-RoPE) a block's keys are spread, so
``|mean_k|`` under-states them and the pooled estimate recovers little of the dropped mass; the error
drops only a little (CPU, 4096 tokens, head dim 64, block 128: threshold 0.05 7.97% -> 7.88%, 0.2
14.8% -> 14.4%, ``benchmarks/results/attention_compensate_cpu.json``); on block-smooth keys it
removes most of it (tests). The pooled part costs ``N x N / block_size`` scores. The
reference path folds it into its fp32 online-softmax accumulator after the early stop; the flex
path computes the sparse part with its log-sum-exp and merges the two exactly::

    m = max(lse1, lse2);  out = (e^(lse1-m) out1 + e^(lse2-m) out2) / (e^(lse1-m) + e^(lse2-m))

Nothing skipped (``threshold=0``) means nothing added: the result is still dense SDPA.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "block_selection",
    "block_sparse_attention",
    "compensated_block_attention_dense",
    "flex_available",
    "flex_block_sparse_attention",
    "masked_block_attention_dense",
    "merge_lse",
]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, threshold: float,
           compensate: bool = False) -> None:
    if not isinstance(compensate, bool):
        raise TypeError(f"compensate must be a bool (True / False), got {compensate!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape != k.shape or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            "block-sparse attention needs self-attention with matching q/k/v batch, heads and length; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (use dense SDPA for cross-attention)"
        )
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0 (0 = exact), got {threshold}")


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, H, N, D) -> (B, H, Nb, bs, D), zero-padded."""
    b, h, n, d = x.shape
    nb = -(-n // block_size)
    pad = nb * block_size - n
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.view(b, h, nb, block_size, d)


def _block_means(xb: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block means (B, H, Nb, D) fp32 of blocked ``xb`` (B, H, Nb, bs, D) over its ``n`` real
    (unpadded) tokens, and log n_j (Nb,) fp32."""
    nb, block_size = xb.shape[2], xb.shape[3]
    counts = torch.full((nb,), float(block_size), device=xb.device)
    counts[-1] = n - (nb - 1) * block_size
    return xb.sum(3, dtype=torch.float32) / counts[:, None], counts.log()


def _estimates(
    qb: torch.Tensor, kb: torch.Tensor, n: int, block_size: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled scores est (B, H, Nb, Nb) and log n_j (Nb,) per key block."""
    qm, log_counts = _block_means(qb, n)
    km, _ = _block_means(kb, n)
    return torch.matmul(qm, km.transpose(-1, -2)) * scale, log_counts


def _pool(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block means (B, H, Nb, D) fp32 over the real tokens, and log n_j (Nb,) fp32."""
    return _block_means(_blocks(x, block_size), x.shape[2])


_POOLED_CHUNK_BYTES = 256 * 2**20  # fp32 pooled scores materialised at once (flex path)


def _pooled_remainder(
    q: torch.Tensor, kept: torch.Tensor, km: torch.Tensor, vm: torch.Tensor, log_counts: torch.Tensor,
    block_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled contribution of the key blocks *not* kept, per query token.

    q (B, H, N, D); kept (B, H, Nb, Nb) bool; km (B, H, Nb, D), vm (B, H, Nb, Dv) fp32 block means;
    returns (out2 (B, H, N, Dv) fp32, lse2 (B, H, N) fp32, natural log) of the scores
    ``scale * q . mean_k_j + log n_j`` over the dropped blocks ``j``. Rows with every block kept get
    ``lse2 = -inf`` and ``out2 = 0``. The query dimension is chunked so that at most ~256 MB of fp32
    scores exist at once; chunk sizes come from shapes only (no host sync). Without autograd the
    score buffer is updated in place (fewer passes over it).
    """
    b, h, n, d = q.shape
    nbk = km.shape[2]
    dv = vm.shape[-1]
    per_row = max(1, b * h * nbk * 4)
    chunk = max(block_size, (_POOLED_CHUNK_BYTES // per_row) // block_size * block_size)
    tok_block = torch.arange(n, device=q.device) // block_size
    kmt = (km * scale).transpose(-1, -2).reshape(b * h, d, nbk)  # scale folded into the pooled keys
    vm2 = vm.reshape(b * h, nbk, dv)
    inplace = not (torch.is_grad_enabled() and (q.requires_grad or km.requires_grad or vm.requires_grad))
    outs, lses = [], []
    for s0 in range(0, n, chunk):
        s1 = min(n, s0 + chunk)
        c = s1 - s0
        qc = q[:, :, s0:s1].float().reshape(b * h, c, d)
        sc = torch.baddbmm(log_counts.expand(b * h, c, nbk), qc, kmt)  # (B*H, c, Nb)
        kept_c = kept.index_select(2, tok_block[s0:s1]).reshape(b * h, c, nbk)
        sc = sc.masked_fill_(kept_c, -math.inf) if inplace else sc.masked_fill(kept_c, -math.inf)
        lse = torch.logsumexp(sc, dim=-1)
        shift = torch.where(torch.isfinite(lse), lse, 0.0)[..., None]
        p = sc.sub_(shift).exp_() if inplace else torch.exp(sc - shift)  # 0 where masked
        outs.append(torch.bmm(p, vm2).view(b, h, c, dv))
        lses.append(lse.view(b, h, c))
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def merge_lse(out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Exact merge of two softmax-attention parts over disjoint key sets, each given as its normalised
    output and natural-log log-sum-exp of its scores: returns fp32
    ``(e^(lse1-m) out1 + e^(lse2-m) out2) / (e^(lse1-m) + e^(lse2-m))``, ``m = max(lse1, lse2)``.
    A part with ``lse = -inf`` (no keys) gets weight 0 (its ``out`` is ignored, even if NaN)."""
    lse1 = lse1.float()
    lse2 = lse2.float()
    m = torch.maximum(lse1, lse2)
    m = torch.where(torch.isfinite(m), m, 0.0)
    w1 = torch.exp(lse1 - m)
    w2 = torch.exp(lse2 - m)
    o1 = torch.where((w1 > 0)[..., None], out1.float(), 0.0)
    o2 = torch.where((w2 > 0)[..., None], out2.float(), 0.0)
    return (w1[..., None] * o1 + w2[..., None] * o2) / (w1 + w2)[..., None]


def _forced(nb: int, block_size: int, local_window: int, global_tokens: int, device: Any) -> torch.Tensor:
    """(Nb, Nb) bool: key blocks always computed for each query block."""
    idx = torch.arange(nb, device=device)
    forced = (idx[:, None] - idx[None, :]).abs() <= local_window if local_window > 0 else torch.zeros(
        nb, nb, dtype=torch.bool, device=device
    )
    if global_tokens > 0:
        n_global_blocks = min(nb, -(-global_tokens // block_size))
        forced = forced | (idx[None, :] < n_global_blocks)
    return forced


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 64,
    threshold: float = 0.0,
    local_window: int = 0,
    global_tokens: int = 0,
    scale: float | None = None,
    return_density: bool = False,
    compensate: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference S2O block-sparse attention with online early stopping (see the module docstring).

    Returns ``out`` (same shape and dtype as ``q``), or ``(out, density)`` with ``return_density``:
    density is a 0-dim tensor, the fraction of (query block, key block) pairs computed over batch
    and heads (pooled compensation is not counted).

    ``compensate``: the stop rule already estimates the mass of the blocks it skips; instead of
    dropping it, fold each skipped key block's pooled estimate (``n_j exp(scale q . mean_k_j)``
    times ``mean_v_j``), per query token, into the same fp32 accumulator after the early stop.
    ``threshold=0`` skips nothing and stays exact.
    """
    _check(q, k, v, block_size, threshold, compensate)
    b, h, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out_dtype = q.dtype
    qb = _blocks(q.float(), block_size)
    kb = _blocks(k.float(), block_size)
    vb = _blocks(v.float(), block_size)
    nb = qb.shape[2]
    dv = vb.shape[-1]
    device = q.device

    est, log_counts = _estimates(qb, kb, n, block_size, scale)
    est_mass = est + log_counts  # log of estimated block mass
    forced = _forced(nb, block_size, local_window, global_tokens, device)
    n_forced = forced.sum(-1)  # (Nb,)
    # forced blocks first (in index order), then the rest by decreasing estimate
    priority = torch.where(forced, torch.finfo(torch.float32).max, est_mass)
    order = priority.argsort(dim=-1, descending=True, stable=True)  # (B, H, Nb, Nb)
    ranked_mass = est_mass.gather(-1, order)
    # rem_lse[..., t] = logsumexp of ranked masses strictly after position t
    suffix = ranked_mass.flip(-1).logcumsumexp(-1).flip(-1)
    rem_lse = torch.cat([suffix[..., 1:], torch.full_like(suffix[..., :1], -math.inf)], dim=-1)

    key_valid = torch.ones(nb, block_size, dtype=torch.bool, device=device)
    key_valid.view(-1)[n:] = False

    m = torch.full((b, h, nb, block_size), -math.inf, device=device)
    l = torch.zeros((b, h, nb, block_size), device=device)
    acc = torch.zeros((b, h, nb, block_size, dv), device=device)
    active = torch.ones((b, h, nb), dtype=torch.bool, device=device)
    computed = torch.zeros((), device=device)
    # ranking positions computed per query block (only compensation needs them)
    steps_done = torch.zeros((b, h, nb), dtype=torch.long, device=device) if compensate else None
    for t in range(nb):
        idx = order[..., t]  # (B, H, Nb)
        gidx = idx[..., None, None].expand(b, h, nb, block_size, d)
        k_sel = kb.gather(2, gidx)
        v_sel = vb.gather(2, idx[..., None, None].expand(b, h, nb, block_size, dv))
        s = torch.matmul(qb, k_sel.transpose(-1, -2)) * scale  # (B, H, Nb, bs_q, bs_k)
        s = s.masked_fill(~key_valid[idx][..., None, :], -math.inf)
        m_new = torch.maximum(m, s.amax(-1))
        p = torch.exp(s - m_new[..., None])
        alpha = torch.exp(m - m_new)
        l_new = l * alpha + p.sum(-1)
        acc_new = acc * alpha[..., None] + torch.matmul(p, v_sel)
        a = active[..., None]
        m = torch.where(a, m_new, m)
        l = torch.where(a, l_new, l)
        acc = torch.where(a[..., None], acc_new, acc)
        computed = computed + active.sum()
        if steps_done is not None:
            steps_done = steps_done + active
        if t == nb - 1 or threshold == 0:
            continue  # exact mode: every block stays active, no stopping test (and no host sync)
        # estimated share of what is left, per row, relative to the running normaliser
        ratio = torch.exp(rem_lse[..., t, None] - m) / l  # (B, H, Nb, bs_q)
        keep_going = ratio.amax(-1) >= threshold
        still_forced = (t + 1) < n_forced  # (Nb,)
        active = active & (keep_going | still_forced)
        if not bool(active.any()):
            break
    if compensate and threshold != 0:
        # key blocks each query block did not compute: ranking positions >= steps_done
        rem_ranked = torch.arange(nb, device=device) >= steps_done[..., None]  # (B, H, Nb, Nb), rank order
        skipped = torch.zeros_like(rem_ranked).scatter(-1, order, rem_ranked)  # key-block order
        km, log_n = _block_means(kb, n)  # the fp32 blocks already made for the ranking
        vm, _ = _block_means(vb, n)
        # pooled scores per query token against every key block; only skipped blocks count
        sc = torch.matmul(qb, km.transpose(-1, -2)[:, :, None]) * scale + log_n  # (B, H, Nb, bs, Nb)
        sc = sc.masked_fill(~skipped[..., None, :], -math.inf)
        m_new = torch.maximum(m, sc.amax(-1))  # m is finite: every row computed >= 1 real key
        p = torch.exp(sc - m_new[..., None])
        alpha = torch.exp(m - m_new)
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + torch.matmul(p, vm[:, :, None])
        m = m_new
    out = (acc / l[..., None]).reshape(b, h, nb * block_size, dv)[:, :, :n].to(out_dtype)
    if return_density:
        return out, computed / (b * h * nb * nb)
    return out


def block_selection(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 64,
    threshold: float = 0.0,
    local_window: int = 0,
    global_tokens: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Up-front selection (B, H, Nb, Nb) bool: per query block, the forced blocks plus the smallest
    set of top-ranked other key blocks whose estimated mass share reaches ``1 - threshold``."""
    _check(q, k, k, block_size, threshold)
    n, d = q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qb = _blocks(q.float(), block_size)
    kb = _blocks(k.float(), block_size)
    nb = qb.shape[2]
    if threshold == 0:
        return torch.ones(q.shape[0], q.shape[1], nb, nb, dtype=torch.bool, device=q.device)
    est, log_counts = _estimates(qb, kb, n, block_size, scale)
    full_share = torch.softmax(est + log_counts, dim=-1)
    forced = _forced(nb, block_size, local_window, global_tokens, q.device)
    share = full_share.masked_fill(forced, 0.0)  # forced mass is covered already
    sorted_share, order = share.sort(dim=-1, descending=True, stable=True)
    forced_share = full_share.masked_fill(~forced, 0.0).sum(-1, keepdim=True)
    # keep a ranked block while the mass covered before it is still short of 1 - threshold
    covered_before = forced_share + sorted_share.cumsum(-1) - sorted_share
    keep_sorted = covered_before < 1.0 - threshold
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep | forced


def masked_block_attention_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor, *, block_size: int, scale: float | None = None
) -> torch.Tensor:
    """Dense SDPA restricted to the kept (query block, key block) pairs; for tests (O(N^2) memory)."""
    n = q.shape[2]
    tok = torch.arange(n, device=q.device) // block_size
    mask = kept[..., tok[:, None], tok[None, :]]  # (B, H, N, N)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def compensated_block_attention_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor, *, block_size: int, scale: float | None = None
) -> torch.Tensor:
    """Dense reference for remainder compensation; for tests (O(N^2) memory).

    One SDPA call over the real keys plus one pooled key per block (``[k; mean_k]``, ``[v; mean_v]``)
    with an additive float mask: a real key counts where its block is kept, block ``j``'s pooled key
    (with bias ``log n_j``) where it is not. Independent of :func:`merge_lse` and the online path."""
    b, h, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    km, log_n = _pool(k, block_size)
    vm, _ = _pool(v, block_size)
    tok = torch.arange(n, device=q.device) // block_size
    kept_tok = kept[..., tok, :]  # (B, H, N, Nb)
    real = torch.where(kept_tok[..., tok], 0.0, -math.inf)  # (B, H, N, N)
    pooled = torch.where(kept_tok, -math.inf, log_n)  # (B, H, N, Nb)
    mask = torch.cat([real, pooled], dim=-1)
    kk = torch.cat([k.float(), km], dim=2)
    vv = torch.cat([v.float(), vm], dim=2)
    out = F.scaled_dot_product_attention(q.float(), kk, vv, attn_mask=mask, scale=scale)
    return out.to(q.dtype)


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


_COMPILED_FLEX: Any = None


def _flex_fn(device: torch.device) -> Any:
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention  # eager fallback: correct, materialises the scores
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def _flex_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any,
                   scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """flex_attention's (out, lse); flex returns the natural-log LSE of the scaled scores (its
    kernels keep base-2 statistics internally and convert them before returning)."""
    fn = _flex_fn(q.device)
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # older torch: the (since deprecated) return_lse flag
        return fn(q, k, v, block_mask=block_mask, scale=scale, return_lse=True)
    out, aux = fn(q, k, v, block_mask=block_mask, scale=scale, return_aux=AuxRequest(lse=True))
    return out, aux.lse


def flex_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 64,
    threshold: float = 0.0,
    local_window: int = 0,
    global_tokens: int = 0,
    scale: float | None = None,
    return_density: bool = False,
    compensate: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention with a BlockMask from :func:`block_selection` (compiled on CUDA; on GPU use a
    ``block_size`` the flex kernel tiles well, i.e. 128 or a multiple of it).

    ``compensate``: the selection already estimates the mass of the dropped key blocks; instead of
    dropping it, add it: flex computes the kept blocks with its log-sum-exp, the dropped blocks are
    approximated per query token by their pooled keys/values (``N x N / block_size`` scores in plain
    torch, fp32, query dimension chunked to bound memory, no host sync) and the two parts are merged
    exactly (:func:`merge_lse`). The output is in ``q``'s dtype. ``threshold=0`` keeps every block and
    runs no compensation."""
    _check(q, k, v, block_size, threshold, compensate)
    if not flex_available():
        raise RuntimeError(
            f"torch {torch.__version__} has no torch.nn.attention.flex_attention; use backend='reference'"
        )
    from torch.nn.attention.flex_attention import BlockMask

    kept = block_selection(
        q, k, block_size=block_size, threshold=threshold, local_window=local_window,
        global_tokens=global_tokens, scale=scale,
    )
    b, h, nb, _ = kept.shape
    n = q.shape[2]
    # Kept blocks are "full" blocks (no mask_mod evaluation in the compiled kernel); a ragged last key
    # block goes in as a "partial" block. The mask_mod repeats the selection because flex's eager
    # fallback (CPU) applies only the mask_mod, not the block structure.
    ragged = n % block_size != 0
    full = kept.clone()
    if ragged:
        full[..., -1] = False
    partial = kept & ~full
    full_num = full.sum(-1, dtype=torch.int32)
    full_idx = full.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    part_num = partial.sum(-1, dtype=torch.int32)
    part_idx = partial.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)

    def mask_mod(bi: Any, hi: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return kept[bi, hi, q_idx // block_size, kv_idx // block_size]

    block_mask = BlockMask.from_kv_blocks(
        part_num, part_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(n, n)
    )
    if compensate and threshold != 0:
        out1, lse1 = _flex_with_lse(q, k, v, block_mask, scale)
        d = q.shape[-1]
        sc = 1.0 / math.sqrt(d) if scale is None else scale
        km, log_n = _pool(k, block_size)
        vm, _ = _pool(v, block_size)
        out2, lse2 = _pooled_remainder(q, kept, km, vm, log_n, block_size, sc)
        out = merge_lse(out1, lse1, out2, lse2).to(q.dtype)
    else:
        out = _flex_fn(q.device)(q, k, v, block_mask=block_mask, scale=scale)
    if return_density:
        return out, kept.float().mean()
    return out
