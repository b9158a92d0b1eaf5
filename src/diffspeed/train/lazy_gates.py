"""Lazy learning of LazyDiT gates (:mod:`diffspeed.methods.lazy`): ``diffspeed train-gates lazy ...``.

The model stays frozen; only the gates (``w_b``, ``c_b`` per block) and the reuse scales ``alpha_b``
are learned.

1. **Collection** (:func:`collect_lazy_data`): the full sampler (flow-matching Euler, batched CFG,
   exactly :func:`diffspeed.sampler.sample`) runs on N training (seed, label) pairs with a recorder
   on every block. Per block ``b``, step ``t`` and batch row (CFG uncond and cond rows are separate
   rows) it keeps the gate feature ``f_b(t - 1)`` (the pooled modulated block input of the *previous*
   step, computed by the same :class:`~diffspeed.methods.lazy.BlockFeature` as inference: the gates
   are trained for the method's one-step lag) and four per-row scalars of the block's residual ``r``
   (output minus input; hidden and, where the block returns them, encoder states) and output ``y``:
   ``A = |r_{t-1}|^2``, ``B = <r_{t-1}, r_t>``, ``C = |r_t|^2``, ``Y = |y_t|^2`` (means over elements).
   These are all the loss needs: the residual tensors themselves are never stored, so N can be large.
2. **Fit** (:func:`fit_lazy_gates`): with soft gating the block output is
   ``y_lazy = x + g alpha r_{t-1} + (1 - g) r_t``, so ``|y_lazy - y_full|^2 = g^2 |alpha r_{t-1} - r_t|^2
   = g^2 (alpha^2 A - 2 alpha B + C)``. The loss per block is the mean over rows of that, relative to
   ``Y`` (the relative squared error of the block output: blocks and steps of different magnitude
   weigh alike), plus ``lambda * (1 - mean g)`` (the laziness penalty), plus a small L2 on ``w``.
   Full-batch Adam on standardised features (folded back into ``w``, ``c`` at the end); ``alpha_b``
   starts at 1 and is re-solved in closed form (``sum g^2 B / sum g^2 A``, weighted by the gates) after
   every step. The per-row optimum is ``g = min(1, lambda / (2 e))``, so at threshold 0.5 a block
   skips roughly where the reuse error ``e < lambda``.
3. **Skip ratio**: ``lambda`` sets it; with ``target_skip`` (the default of the CLI) ``lambda`` is found
   by bisection in log space so that the *simulated* skipped fraction on the training trajectories
   (threshold 0.5, ``warmup_steps`` and ``max_consecutive`` applied per row as the method does; over
   all steps and blocks, comparable with the method's ``skipped_fraction`` stat) is close to it. The
   method decides on the batch mean of the gates, so the fraction measured at inference differs a little.

Limits: the fit is teacher-forced on the full model's trajectory (the inputs of a block at inference
drift once earlier blocks skipped); the loss is the block output's fidelity, not the final image's;
gates are for one step count and guidance scale (recorded in ``lazy.json``).

Output: a directory with ``gates.safetensors`` and ``lazy.json`` (see :mod:`diffspeed.methods.lazy`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import typer

from ..errors import DiffspeedError

TRAIN_THRESHOLD = 0.5


@dataclass
class LazyData:
    """What the loss needs, for ``T'`` gated steps and ``S`` batch rows (CFG rows count separately)."""

    feats: torch.Tensor  # (n_blocks, T', S, D) float32: gate features of the previous step
    stats: torch.Tensor  # (n_blocks, T', S, 4) float64: A, B, C, Y (see the module doc)
    steps: list[int]  # the T' steps the rows are for (warmup_steps .. num_steps - 1)
    num_steps: int
    warmup_steps: int
    feature_kinds: list[str]
    info: dict[str, Any]


def _row_dot(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, int]:
    """Per batch row: sum over the pairs of <a, b> (float64), and the number of elements per row."""
    total, count = None, 0
    for a, b in pairs:
        s = (a.double() * b.double()).flatten(1).sum(1)
        total = s if total is None else total + s
        count += a[0].numel()
    return total, count


def collect_lazy_data(
    loaded: Any,
    *,
    num_steps: int,
    seeds: Sequence[int],
    labels: Sequence[int],
    guidance_scale: float,
    shift: float = 1.0,
    warmup_steps: int = 2,
    batch_size: int = 64,
    progress: bool = False,
) -> LazyData:
    """Run the full model on the training samples and record the per-row features and residual statistics."""
    from ..context import get_context
    from ..hooks import wrap_forward
    from ..methods.lazy import block_features, split_residual
    from ..sampler import sample

    if num_steps < 2:
        raise DiffspeedError(f"--steps must be >= 2 (a gate decides from the previous step), got {num_steps}")
    if not 1 <= warmup_steps < num_steps:
        raise DiffspeedError(f"--warmup must be in [1, steps - 1] = [1, {num_steps - 1}], got {warmup_steps}")
    if len(seeds) != len(labels) or not seeds:
        raise DiffspeedError(f"need one label per seed and at least one seed, got {len(seeds)} seeds, {len(labels)} labels")
    model, adapter = loaded.transformer, loaded.adapter
    blocks = adapter.blocks(model)
    features = block_features(adapter, model)
    ctx = get_context(model)
    device = next(model.parameters()).device
    gated = list(range(warmup_steps, num_steps))
    per_block_feats: list[list[torch.Tensor]] = [[] for _ in blocks]  # per batch: (T', S_batch, D)
    per_block_stats: list[list[torch.Tensor]] = [[] for _ in blocks]
    state: dict[str, Any] = {}

    def recorder(i: int, io: Any, inner: Any, *args: Any, **kwargs: Any) -> Any:
        step = ctx.step_index
        hidden, encoder = io.get_states(args, kwargs)
        feat = features[i].compute(hidden, args, kwargs)
        out = inner(*args, **kwargs)
        h_out, e_out, res_h, res_e = split_residual(io, hidden, encoder, out)
        prev = state["prev"][i]
        if step >= warmup_steps and prev is not None and prev["step"] == step - 1:
            pr_h, pr_e = prev["res"]
            use_e = pr_e is not None and res_e is not None and pr_e.shape == res_e.shape
            prev_parts, now_parts = [pr_h] + ([pr_e] if use_e else []), [res_h] + ([res_e] if use_e else [])
            a, n = _row_dot([(p, p) for p in prev_parts])
            b, _ = _row_dot(list(zip(prev_parts, now_parts)))
            cc, _ = _row_dot([(p, p) for p in now_parts])
            y, ny = _row_dot([(p, p) for p in [h_out] + ([e_out] if use_e else [])])
            state["feats"][i].append(prev["feat"])
            state["stats"][i].append(torch.stack([a / n, b / n, cc / n, y / ny], dim=-1))
        state["prev"][i] = {"step": step, "feat": feat, "res": (res_h, res_e)}
        return out

    handles = []
    bar = task = None
    try:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:  # pragma: no cover - rich is a dependency; a bare environment just gets no bar
        progress = False
    if progress:
        bar = Progress(TextColumn("collecting"), BarColumn(), TextColumn("{task.completed}/{task.total} samples"),
                       TimeElapsedColumn(), transient=True)
        task = bar.add_task("samples", total=len(seeds))
        bar.start()
    t0 = time.perf_counter()
    try:
        for i, (_, block, io) in enumerate(blocks):
            fn = lambda inner, *a, _i=i, _io=io, **k: recorder(_i, _io, inner, *a, **k)  # noqa: E731
            handles.append(wrap_forward(block, fn))
        for start in range(0, len(seeds), batch_size):
            s_seeds, s_labels = list(seeds[start:start + batch_size]), list(labels[start:start + batch_size])
            state.update(prev=[None] * len(blocks), feats=[[] for _ in blocks], stats=[[] for _ in blocks])
            condition = loaded.make_condition(s_labels, device)
            with torch.no_grad():
                sample(model, condition, seeds=s_seeds, latent_shape=loaded.latent_shape, num_steps=num_steps,
                       guidance_scale=guidance_scale, shift=shift, cfg_mode="batched", adapter=adapter,
                       check_finite=False)
            for i in range(len(blocks)):
                if len(state["feats"][i]) != len(gated):
                    raise DiffspeedError(
                        f"block {i} was called {len(state['feats'][i])} times on gated steps, expected {len(gated)}; "
                        "lazy gate training needs one block call per step (batched CFG)"
                    )
                per_block_feats[i].append(torch.stack(state["feats"][i]))
                per_block_stats[i].append(torch.stack(state["stats"][i]))
            if bar is not None:
                bar.update(task, advance=len(s_seeds))
    finally:
        for h in handles:
            h.remove()
        state.clear()
        if bar is not None:
            bar.stop()
    feats = torch.stack([torch.cat(f, dim=1) for f in per_block_feats])
    stats = torch.stack([torch.cat(s, dim=1) for s in per_block_stats])
    return LazyData(feats=feats.float(), stats=stats, steps=gated, num_steps=num_steps, warmup_steps=warmup_steps,
                    feature_kinds=[f.kind for f in features],
                    info={"collect_seconds": round(time.perf_counter() - t0, 3),
                          "rows_per_block": feats.shape[1] * feats.shape[2]})


@dataclass
class FitResult:
    w: torch.Tensor  # (n_blocks, D)
    c: torch.Tensor  # (n_blocks,)
    alpha: torch.Tensor  # (n_blocks,)
    lam: float
    loss: float
    report: dict[str, Any]


def gate_values(data: LazyData, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(n_blocks, T', S) gate values of the training rows."""
    return torch.sigmoid(torch.einsum("btsd,bd->bts", data.feats, w.to(data.feats)) + c.to(data.feats)[:, None, None])


def simulate_skips(data: LazyData, g: torch.Tensor, threshold: float = TRAIN_THRESHOLD,
                   max_consecutive: int = 2) -> torch.Tensor:
    """Per block, the fraction of all steps (warm-up included) skipped, per row as the method does it."""
    n_blocks, n_gated, rows = g.shape
    consecutive = torch.zeros(n_blocks, rows, dtype=torch.long, device=g.device)
    skipped = torch.zeros(n_blocks, rows, dtype=torch.long, device=g.device)
    for k in range(n_gated):
        skip = (g[:, k] > threshold) & (consecutive < max_consecutive)
        consecutive = torch.where(skip, consecutive + 1, torch.zeros_like(consecutive))
        skipped += skip.long()
    return skipped.double().mean(1) / data.num_steps


def reuse_error(data: LazyData, alpha: torch.Tensor) -> torch.Tensor:
    """(n_blocks, T', S) relative squared error of the block output when the row is skipped."""
    a, b, cc, y = data.stats.to(data.feats.device).unbind(-1)
    al = alpha.double().to(a.device)[:, None, None]
    return ((al * al * a - 2 * al * b + cc).clamp_min(0) / y.clamp_min(1e-30)).float()


def fit_lazy_gates(data: LazyData, lam: float, *, iters: int = 500, lr: float = 0.05, weight_decay: float = 1e-3,
                   max_consecutive: int = 2) -> FitResult:
    """Lazy learning for one laziness weight ``lam`` (see the module doc)."""
    if not lam > 0 or not math.isfinite(lam):
        raise DiffspeedError(f"--lam must be a positive number, got {lam}")
    feats = data.feats
    n_blocks, n_gated, rows, dim = feats.shape
    flat = feats.reshape(n_blocks, n_gated * rows, dim)
    mu = flat.mean(1, keepdim=True)
    sd = flat.std(1, keepdim=True).clamp_min(1e-6) if flat.shape[1] > 1 else torch.ones_like(mu)
    z = (flat - mu) / sd
    a, b, cc, y = (t.reshape(n_blocks, -1) for t in data.stats.to(feats.device).unbind(-1))
    y = y.clamp_min(1e-30)
    a_rel, b_rel, c_rel = (a / y).float(), (b / y).float(), (cc / y).float()
    v = torch.zeros(n_blocks, dim, device=feats.device, requires_grad=True)
    b0 = torch.zeros(n_blocks, device=feats.device, requires_grad=True)
    alpha = torch.ones(n_blocks, device=feats.device)
    opt = torch.optim.Adam([v, b0], lr=lr)
    loss = torch.zeros(())
    with torch.enable_grad():
        for _ in range(iters):
            g = torch.sigmoid(torch.einsum("brd,bd->br", z, v) + b0[:, None])
            al = alpha[:, None]
            err = (al * al * a_rel - 2 * al * b_rel + c_rel).clamp_min(0)
            fidelity = (g * g * err).mean(1)
            laziness = 1 - g.mean(1)
            # divided by lam: the same minimiser, but the terms are O(1) near the decision boundary
            # (e ~ lam) whatever the error scale of the model, so weight_decay means the same everywhere
            loss = (fidelity / lam + laziness).sum() + weight_decay * (v * v).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():  # closed-form alpha for the current gates (weighted least squares)
                g2 = g.detach() ** 2
                num, den = (g2 * b_rel).sum(1), (g2 * a_rel).sum(1)
                alpha = torch.where(den > 1e-12, num / den.clamp_min(1e-12), torch.ones_like(den)).clamp(0.0, 2.0)
    with torch.no_grad():
        w = (v / sd[:, 0]).detach()
        c = (b0 - (v * mu[:, 0] / sd[:, 0]).sum(-1)).detach()
        g = gate_values(data, w, c)
        err = reuse_error(data, alpha)
        skip = g > TRAIN_THRESHOLD
        sim = simulate_skips(data, g, TRAIN_THRESHOLD, max_consecutive)
        n_skip = skip.sum(dim=(1, 2)).clamp_min(1)
        report = {
            "skip_ratio": float(skip.float().mean()),  # gated rows with g > 0.5
            "skipped_fraction": float(sim.mean()),  # simulated: all steps, warm-up + max_consecutive applied
            "mean_gate": float(g.mean()),
            "per_block": [
                {"alpha": float(alpha[i]), "skip_ratio": float(skip[i].float().mean()),
                 "skipped_fraction": float(sim[i]), "mean_gate": float(g[i].mean()),
                 "reuse_error_skipped": float((err[i] * skip[i]).sum() / n_skip[i]),
                 "reuse_error_all": float(err[i].mean())}
                for i in range(n_blocks)
            ],
        }
    return FitResult(w.cpu(), c.cpu(), alpha.cpu(), float(lam), float(loss.detach()), report)


def fit_for_target(data: LazyData, target_skip: float, *, iters: int = 500, lr: float = 0.05,
                   weight_decay: float = 1e-3, max_consecutive: int = 2, rounds: int = 14,
                   lam_bounds: tuple[float, float] | None = None) -> FitResult:
    """Bisect ``lam`` (log scale) so that the simulated skipped fraction is close to ``target_skip``.

    Default bounds: the median reuse error (alpha = 1) of the training rows times 1e-3 .. 1e3 (lambda is on
    the scale of the errors it tolerates)."""
    cap = max_consecutive / (max_consecutive + 1) * (data.num_steps - data.warmup_steps) / data.num_steps
    if not 0 < target_skip < 1:
        raise DiffspeedError(f"--target-skip must be in (0, 1), got {target_skip}")
    if lam_bounds is None:
        med = float(reuse_error(data, torch.ones(data.feats.shape[0])).median())
        med = med if math.isfinite(med) and med > 0 else 1e-3
        lam_bounds = (med * 1e-3, med * 1e3)
    lo, hi = math.log(lam_bounds[0]), math.log(lam_bounds[1])
    best: FitResult | None = None
    tried = []
    for _ in range(rounds):
        mid = (lo + hi) / 2
        res = fit_lazy_gates(data, math.exp(mid), iters=iters, lr=lr, weight_decay=weight_decay,
                             max_consecutive=max_consecutive)
        got = res.report["skipped_fraction"]
        tried.append({"lam": res.lam, "skipped_fraction": got})
        if best is None or abs(got - target_skip) < abs(best.report["skipped_fraction"] - target_skip):
            best = res
        if got < target_skip:
            lo = mid
        else:
            hi = mid
        if abs(got - target_skip) < 0.005:
            break
    assert best is not None
    best.report["lambda_search"] = tried
    if target_skip > cap:
        best.report["note"] = (f"target {target_skip} exceeds what warm-up and max_consecutive allow ({cap:.3f})")
    return best


def train_lazy_gates(
    loaded: Any,
    *,
    num_steps: int = 25,
    seeds: Sequence[int],
    labels: Sequence[int] | None = None,
    guidance_scale: float = 4.0,
    shift: float = 1.0,
    lam: float | None = None,
    target_skip: float | None = None,
    warmup_steps: int = 2,
    max_consecutive: int = 2,
    iters: int = 500,
    lr: float = 0.05,
    weight_decay: float = 1e-3,
    batch_size: int = 64,
    progress: bool = False,
) -> tuple[FitResult, dict[str, Any]]:
    """Collect, fit, and build the ``lazy.json`` metadata; returns (fit, meta). Save with
    :func:`diffspeed.methods.lazy.save_lazy_gates` (or :func:`save_trained`)."""
    from ..calibrate import model_identity

    if (lam is None) == (target_skip is None):
        raise DiffspeedError("give exactly one of lam (laziness weight) and target_skip (skip ratio to aim at)")
    if labels is None:
        k = loaded.num_classes or 1
        labels = [i % k for i in range(len(seeds))]
    t0 = time.perf_counter()
    data = collect_lazy_data(loaded, num_steps=num_steps, seeds=seeds, labels=labels, guidance_scale=guidance_scale,
                             shift=shift, warmup_steps=warmup_steps, batch_size=batch_size, progress=progress)
    t1 = time.perf_counter()
    kw = dict(iters=iters, lr=lr, weight_decay=weight_decay, max_consecutive=max_consecutive)
    fit = fit_lazy_gates(data, lam, **kw) if lam is not None else fit_for_target(data, target_skip, **kw)
    try:
        from .. import __version__ as version
    except ImportError:  # pragma: no cover
        version = "unknown"
    meta = {
        "model": model_identity(loaded.transformer, loaded.name),
        "granularity": "block",
        "feature_kinds": data.feature_kinds,
        "num_steps": num_steps,
        "guidance_scale": guidance_scale,
        "shift": shift,
        "cfg_mode": "batched",
        "lambda": fit.lam,
        "target_skip": target_skip,
        "train_threshold": TRAIN_THRESHOLD,
        "warmup_steps": warmup_steps,
        "max_consecutive": max_consecutive,
        "skip_ratio": fit.report["skip_ratio"],
        "skipped_fraction": fit.report["skipped_fraction"],
        "report": fit.report,
        "training": {
            "seeds": list(map(int, seeds)), "labels": list(map(int, labels)), "iters": iters, "lr": lr,
            "weight_decay": weight_decay, "final_loss": fit.loss, "rows_per_block": data.info["rows_per_block"],
            "collect_seconds": round(t1 - t0, 3), "fit_seconds": round(time.perf_counter() - t1, 3),
            "device": str(data.feats.device), "dtype": str(next(loaded.transformer.parameters()).dtype),
            "diffspeed_version": version,
        },
    }
    return fit, meta


def evaluate_gates(
    loaded: Any,
    fit: FitResult,
    meta: dict[str, Any],
    *,
    seeds: Sequence[int],
    labels: Sequence[int] | None = None,
    thresholds: Sequence[float] = (0.3, 0.5, 0.7),
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """Run the method with the fitted gates on (held-out) samples, at the training step count, guidance and
    warm-up / cap; per threshold: the skipped fraction measured at inference and the error of the final
    pixels against the full model (MSE, PSNR in dB)."""
    from ..methods.lazy import LazyConfig, LazyGates, apply_with_gates
    from ..sampler import sample

    model, adapter = loaded.transformer, loaded.adapter
    device = next(model.parameters()).device
    if labels is None:
        k = loaded.num_classes or 1
        labels = [i % k for i in range(len(seeds))]
    gates = LazyGates(fit.w, fit.c, fit.alpha, meta, "<in memory>")
    kw = dict(latent_shape=loaded.latent_shape, num_steps=meta["num_steps"], guidance_scale=meta["guidance_scale"],
              shift=meta.get("shift", 1.0), cfg_mode="batched", adapter=adapter, check_finite=False)

    def run() -> torch.Tensor:
        outs = []
        for start in range(0, len(seeds), batch_size):
            cond = loaded.make_condition(list(labels[start:start + batch_size]), device)
            outs.append(loaded.to_pixels(sample(model, cond, seeds=list(seeds[start:start + batch_size]), **kw)).float())
        return torch.cat(outs)

    full = run()
    rows = []
    for thr in thresholds:
        cfg = LazyConfig(gates="<in memory>", threshold=float(thr), warmup_steps=meta["warmup_steps"],
                         max_consecutive=meta["max_consecutive"])
        handle = apply_with_gates(model, cfg, adapter, gates)
        try:
            t0 = time.perf_counter()
            out = run()
            seconds = time.perf_counter() - t0
        finally:
            handle.remove()
        mse = float((out - full).pow(2).mean())
        rows.append({"threshold": float(thr), "skipped_fraction": float(handle.stats["skipped_fraction"]),
                     "pixel_mse": mse, "psnr_db": 10 * math.log10(1.0 / mse) if mse > 0 else None,
                     "seconds": round(seconds, 3)})
    return rows


def save_trained(fit: FitResult, meta: dict[str, Any], out: str | os.PathLike) -> Path:
    from ..methods.lazy import save_lazy_gates

    return save_lazy_gates(out, fit.w, fit.c, fit.alpha, meta)


# ---- CLI --------------------------------------------------------------------------------------------
app = typer.Typer(name="train-gates", help="Train learned gates for methods that need them (lazy: LazyDiT).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _train_gates() -> None:
    """Train learned gates for methods that need them (lazy: LazyDiT)."""


def _default_out(model: str) -> Path:
    from ..methods.lazy import BUILTIN_PREFIX, WEIGHTS_DIR

    if model.startswith("reference-"):
        return WEIGHTS_DIR / f"{BUILTIN_PREFIX}{model}"
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in Path(model).name or model).strip("-.") or "model"
    return Path(f"{BUILTIN_PREFIX}{stem}")


@app.command()
def lazy(
    model: str = typer.Option("reference-image", help="model name (see `diffspeed models`), local diffusers dir or hub id"),
    steps: int = typer.Option(25, help="denoising steps of the generations the gates are for"),
    seeds: int = typer.Option(64, "--seeds",
                              help="number of training samples (seeds --seed .. --seed+N-1, labels i % classes)"),
    seed: int = typer.Option(0, help="first training seed"),
    guidance: float = typer.Option(4.0, help="classifier-free guidance scale of those generations"),
    shift: float = typer.Option(1.0, help="sigma shift of the flow-matching schedule"),
    target_skip: Optional[float] = typer.Option(
        0.3, help="skipped fraction of block evaluations to aim at (lambda is searched); ignored with --lam"),
    lam: Optional[float] = typer.Option(None, "--lam", help="laziness weight lambda (fixed; overrides --target-skip)"),
    warmup: int = typer.Option(2, help="first steps always computed (as the method's warmup_steps)"),
    max_consecutive: int = typer.Option(2, help="max skips in a row per block (as the method's max_consecutive)"),
    iters: int = typer.Option(500, help="Adam iterations per fit"),
    lr: float = typer.Option(0.05, help="Adam learning rate (features are standardised)"),
    batch_size: int = typer.Option(64, help="samples per collection batch (x2 rows with CFG)"),
    eval_samples: int = typer.Option(0, help="held-out samples (seeds after the training ones) to run the method "
                                             "on at thresholds 0.3/0.5/0.7 (0 = no evaluation)"),
    out: Optional[Path] = typer.Option(None, help="gates directory (default: weights/lazy-<model> for reference-*, "
                                                  "else ./lazy-<model>)"),
    device: str = typer.Option("auto", help="cuda, cpu or auto"),
    dtype: str = typer.Option("float32", help="model dtype: float32, bfloat16 or float16"),
) -> None:
    """Train LazyDiT gates for one model; write gates.safetensors + lazy.json that `lazy`'s `gates` option reads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        _lazy(model=model, steps=steps, n_seeds=seeds, seed=seed, guidance=guidance, shift=shift,
              target_skip=None if lam is not None else target_skip, lam=lam, warmup=warmup,
              max_consecutive=max_consecutive, iters=iters, lr=lr, batch_size=batch_size, eval_samples=eval_samples,
              out=out, device=device, dtype=dtype)
    except DiffspeedError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _lazy(*, model: str, steps: int, n_seeds: int, seed: int, guidance: float, shift: float,
          target_skip: float | None, lam: float | None, warmup: int, max_consecutive: int, iters: int, lr: float,
          batch_size: int, eval_samples: int, out: Path | None, device: str, dtype: str) -> None:
    if n_seeds <= 0:
        raise DiffspeedError(f"--seeds must be a positive integer (number of training samples), got {n_seeds}")
    if lam is None and target_skip is None:
        raise DiffspeedError("give --target-skip or --lam")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise DiffspeedError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    from ..models.loading import load_model
    from .common import resolve_device

    dev = resolve_device(device)
    out = out if out is not None else _default_out(model)
    if out.exists() and not out.is_dir():
        raise DiffspeedError(f"--out {out} is a file; give a directory")
    loaded = load_model(model, device=dev, dtype=getattr(torch, dtype))
    seed_list = [seed + i for i in range(n_seeds)]
    fit, meta = train_lazy_gates(loaded, num_steps=steps, seeds=seed_list, guidance_scale=guidance, shift=shift,
                                 lam=lam, target_skip=target_skip, warmup_steps=warmup,
                                 max_consecutive=max_consecutive, iters=iters, lr=lr, batch_size=batch_size,
                                 progress=True)
    if eval_samples > 0:
        held_out = [seed + n_seeds + i for i in range(eval_samples)]
        meta["evaluation"] = {"seeds": held_out, "rows": evaluate_gates(loaded, fit, meta, seeds=held_out,
                                                                       batch_size=batch_size)}
    save_trained(fit, meta, out)
    rep = fit.report
    typer.echo(f"wrote {out}: lambda {fit.lam:.4g}, skipped fraction on the training trajectories "
               f"{rep['skipped_fraction']:.3f} (rows with g > 0.5: {rep['skip_ratio']:.3f}), "
               f"collect {meta['training']['collect_seconds']:.1f} s, fit {meta['training']['fit_seconds']:.1f} s")
    for i, blk in enumerate(rep["per_block"]):
        typer.echo(f"  block {i}: alpha {blk['alpha']:.3f}, skipped {blk['skipped_fraction']:.3f}, "
                   f"reuse error (skipped rows) {blk['reuse_error_skipped']:.3g} vs all rows {blk['reuse_error_all']:.3g}")
    for row in meta.get("evaluation", {}).get("rows", []):
        typer.echo(f"  held-out ({eval_samples} samples), threshold {row['threshold']}: skipped fraction "
                   f"{row['skipped_fraction']:.3f}, pixel PSNR vs full "
                   + (f"{row['psnr_db']:.2f} dB" if row["psnr_db"] is not None else "inf (identical)"))
    if "note" in rep:
        typer.echo(f"note: {rep['note']}")
    typer.echo(f"use it with the recipe entry {{\"method\": \"lazy\", \"gates\": \"{out}\"}}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
