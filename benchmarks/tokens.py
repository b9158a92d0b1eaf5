#!/usr/bin/env python
"""Token methods end to end: token merging, region-adaptive sampling, block-sparse attention.

On the trained reference models (default ``reference-video``: Wan, 1024 tokens per clip, and
``reference-image``: DiT, 256 tokens), for each batch (``--batches``, default ``1,fill``: batch 1 and
a GPU-filling batch, ``--fill-image`` / ``--fill-video``) at ``--steps`` (default 25) steps and the
reference evaluation's guidance (4.0, batched CFG), with the same seeds (``seed..seed+batch-1``) and
labels (``i % num_classes``) for every row, it measures:

1. the full model (the baseline of ``speedup`` and of the fidelity metrics, and
   ``full_judge_accuracy`` of every row);
2. ``token_merge`` over a merge-ratio sweep (stride 2; plus one ``reuse_steps=2`` row);
3. ``region_adaptive`` over a recompute-fraction sweep (plus a longer ``full_every`` row);
4. ``sparse_attention`` over an S2O threshold sweep plus global-local settings (``local_window``,
   ``global_tokens``). On CUDA its fast path ``backend="flex"`` (compiled FlexAttention) is used when
   this torch has it, else ``"reference"`` (``--sparse-backend`` overrides); flex runs with
   ``block_size=128`` (64 fails to lower on an H100: the kernel tile is 128), the reference path with
   64. Its ``min_tokens`` is set to the model's token count so the 256-token image model's
   self-attention is sparsified too (with fewer than 8 key blocks, a short 3-setting sweep).

Methods run only on the models they support (an unsupported pair is left out with a log line; an
error while running becomes a row with ``error``). Rows of different methods are interleaved, so a
budget cut loses a little of every method instead of all of one.

Per row: ``model, method, settings, device, device_name, dtype, steps, batch, guidance_scale, seeds,
latency_ms, latency_all_ms, speedup, psnr_db, identical, ssim, rel_error, judge_accuracy,
full_judge_accuracy, work_skipped_fraction, work_measure, linear_rows_skipped_fraction, method_stats,
restored, notes, error`` (``row_s``). The full model's rows have ``method = "full"`` and
``is_method: false`` (every other row ``is_method: true``).

* ``work_skipped_fraction`` is what the method itself counted (``handle.stats``), not a timing:
  ``token_merge``: ``merge_ratio_effective`` (token-block computations merged away);
  ``region_adaptive``: ``skipped_fraction`` (token rows that reused the cache instead of running the
  blocks); ``sparse_attention``: ``1 - mean_density`` over the sparsified self-attention calls,
  scaled by their share of the routed calls (``work_measure`` names which one).
  ``linear_rows_skipped_fraction`` is an independent check: forward pre-hooks on ``to_q`` and each
  block's last linear count the token rows really executed in the first (counted) generation, vs the
  full model (:class:`diffspeed.bench.peers.WorkCounter`; 0 for sparse attention, which skips
  attention pairs, not rows).
* Timing: the counted generation is the first warm-up, then ``--warmup - 1`` more untimed, then
  ``--repeats`` timed generations (denoising loop + decoding; CUDA events on a GPU,
  :func:`diffspeed.bench.timing.time_callable`), median. ``psnr_db`` is null when identical.
* Restore check: after each method's ``remove()``, one more generation must equal the full model's
  output (bit-identical, or within its own run-to-run jitter): the runner's check
  (:func:`diffspeed.bench.runner._check_restored`). A failure sets ``restored: false`` and ``error``
  and reloads the model.
* The full model is timed again after each configuration's last row (``latency_end_ms``,
  ``drift_pct`` in the full row).

Output: ``--out`` (default ``benchmarks/results/tokens.json``), rewritten after every row: ``{"meta":
{device, device_name, torch, diffusers, python, command, argv, truncated, elapsed_s, ...},
"rows": [...]}`` (non-finite numbers as null); ``--plot`` a PNG of speedup vs PSNR, one panel per
model (colour = method, marker = batch). Stdout: a compact table, then one JSON summary line (best
speedup per method/model/batch at PSNR >= 30 dB).

``--budget-s`` (seconds from process start) stops starting rows that would not fit; ``--hard-limit-s``
is a watchdog that writes what was measured and exits 0. Both leave ``truncated: true``.

GPU (one H100, < 8 minutes)::

    PYTHONPATH=src python3 benchmarks/tokens.py --out $OUT/tokens.json --plot $OUT/tokens.png \\
        --budget-s 420 --hard-limit-s 450

(measured on an H100: without sparse attention all four configurations took 170 s; the sparse rows
add about 200 s, the first flex row of a shape includes its compilation.)

CPU smoke::

    PYTHONPATH=src python benchmarks/tokens.py --device cpu --steps 3 --batches 1 --quick \\
        --out /tmp/tokens.json --plot /tmp/tokens.png
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # budgets count from process start, imports included

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

from diffspeed.bench.script import Budget, budget_finisher, fmt as _f, record_drift, start_watchdog  # noqa: E402

PSNR_BAR = 30.0
IDENTICAL_PSNR = 100.0  # where identical outputs are drawn in the plot
METHODS = ("token_merge", "region_adaptive", "sparse_attention")

ROW_FIELDS = (
    "model", "method", "is_method", "settings", "device", "device_name", "dtype", "steps", "batch",
    "guidance_scale", "cfg_mode", "seeds", "latency_ms", "latency_all_ms", "speedup", "psnr_db", "identical",
    "ssim", "rel_error", "judge_accuracy", "full_judge_accuracy", "work_skipped_fraction", "work_measure",
    "linear_rows_skipped_fraction", "method_stats", "restored", "notes", "error",
)


def log(msg: str) -> None:
    print(f"[tokens {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _names(text: str) -> list[str]:
    return [x.strip() for x in str(text).split(",") if x.strip()]


# ---- arguments ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="reference-video,reference-image")
    p.add_argument("--methods", default=",".join(METHODS), help="any of " + ",".join(METHODS))
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batches", default="1,fill", help="comma-separated ints and/or 'fill' (GPU-filling batch)")
    p.add_argument("--fill-image", type=int, default=256, help="the 'fill' batch of image models")
    p.add_argument("--fill-video", type=int, default=32, help="the 'fill' batch of video models")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--guidance", type=float, default=None, help="default: the model's (4.0 with an uncond branch)")
    p.add_argument("--cfg-mode", default="batched", choices=("batched", "separate"))
    p.add_argument("--warmup", type=int, default=1, help="untimed generations; the first one is counted")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="one setting per method, 1 repeat (smoke runs)")
    p.add_argument("--sparse-backend", default=None, choices=("auto", "reference", "flex"),
                   help="default: flex on CUDA when available, else reference")
    p.add_argument("--budget-s", type=float, default=420.0, help="no new row after this (from process start)")
    p.add_argument("--hard-limit-s", type=float, default=465.0, help="watchdog: write and exit 0")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="benchmarks/results/tokens.json")
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first warm-up generation is the counted one)")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.quick:
        args.repeats = 1
    bad = set(_names(args.methods)) - set(METHODS)
    if bad:
        p.error(f"unknown methods {sorted(bad)}; choose from {', '.join(METHODS)}")
    for b in _names(args.batches):
        if b != "fill" and not (b.isdigit() and int(b) >= 1):
            p.error(f"--batches takes positive ints or 'fill', got {b!r}")
    return args


def batches_for(args: argparse.Namespace, is_video: bool) -> list[int]:
    out: list[int] = []
    for b in _names(args.batches):
        n = (args.fill_video if is_video else args.fill_image) if b == "fill" else int(b)
        if n not in out:
            out.append(n)
    return out


# ---- what to measure ---------------------------------------------------------------------------


@dataclasses.dataclass
class Entry:
    method: str
    settings: dict[str, Any]
    config: Any = None  # a MethodConfig (None: the full model)


def _settings(cfg: Any) -> dict[str, Any]:
    data = cfg.to_dict()
    data.pop("method", None)
    return json.loads(json.dumps(data, default=str))


def sweep(method: str, *, steps: int, n_tokens: int, quick: bool, on_cuda: bool,
          sparse_backend: str | None) -> list[dict[str, Any]]:
    """Settings (config kwargs) of one method's sweep."""
    if method == "token_merge":
        if quick:
            return [{"ratio": 0.5}]
        return [{"ratio": r} for r in (0.1, 0.25, 0.5, 0.7)] + [{"ratio": 0.5, "reuse_steps": 2}]
    if method == "region_adaptive":
        # the schedule needs >= 2 warm-up steps; with few steps shrink warm-up/final so partial steps exist
        small = steps < 10
        base = {"warmup_steps": 2, "final_steps": 0} if small else {}
        if quick:
            return [{"recompute_ratio": 0.5, **base}]
        grid = [{"recompute_ratio": r, **base} for r in (0.75, 0.5, 0.35, 0.25)]
        grid.append({"recompute_ratio": 0.5, "full_every": 10, "starvation_steps": 9, **base})
        return grid
    if method == "sparse_attention":
        backend = sparse_backend or ("flex" if on_cuda and _flex_ok() else "reference")
        # the compiled flex kernel needs blocks divisible by its tile (64 fails on an H100: BLOCK_M=128)
        block = 128 if backend == "flex" or (backend == "auto" and on_cuda) else 64
        common = {"block_size": block, "min_tokens": min(1024, n_tokens), "backend": backend}
        if quick:
            return [{"threshold": 0.05, **common}]
        if n_tokens // block < 8:
            # few key blocks (the 256-token image model with 128-token blocks: 2x2): a short sweep
            return ([{"threshold": t, **common} for t in (0.05, 0.2)]
                    + [{"threshold": 0.2, "local_window": 1, "global_tokens": 64, **common}])
        grid = [{"threshold": t, **common} for t in (0.01, 0.02, 0.05, 0.1, 0.2)]
        grid += [{"threshold": t, "local_window": 1, "global_tokens": 64, **common} for t in (0.05, 0.2)]
        return grid
    raise ValueError(method)


def _flex_ok() -> bool:
    from diffspeed.kernels.sparse_attn import flex_available

    return flex_available()


def build_entries(methods: Sequence[str], model: torch.nn.Module, latent_shape: Sequence[int], *, steps: int,
                  quick: bool, on_cuda: bool, sparse_backend: str | None) -> tuple[list[Entry], list[str]]:
    """Interleaved entries of the methods that support ``model``; plus notes on those left out."""
    from diffspeed.methods.region_adaptive import RegionAdaptiveConfig
    from diffspeed.methods.sparse_attention import SparseAttentionConfig
    from diffspeed.methods.token_merge import TokenMergeConfig, token_grid

    classes = {"token_merge": TokenMergeConfig, "region_adaptive": RegionAdaptiveConfig,
               "sparse_attention": SparseAttentionConfig}
    notes: list[str] = []
    try:
        grid = token_grid(model, (1, *tuple(latent_shape)))
        n_tokens = int(math.prod(grid))
    except Exception as exc:  # noqa: BLE001 - the token methods need the grid
        notes.append(f"token grid unknown ({type(exc).__name__}: {exc}): token_merge / region_adaptive left out")
        n_tokens = 0
    per: list[list[Entry]] = []
    for m in methods:
        if m in ("token_merge", "region_adaptive") and not n_tokens:
            continue
        if m == "sparse_attention" and n_tokens and n_tokens < 128:
            notes.append(f"sparse_attention left out: {n_tokens} tokens is too few for 64-token blocks")
            continue
        entries = []
        for s in sweep(m, steps=steps, n_tokens=n_tokens or 1024, quick=quick, on_cuda=on_cuda,
                       sparse_backend=sparse_backend):
            try:
                cfg = classes[m](**s)
                entries.append(Entry(m, _settings(cfg), cfg))
            except Exception as exc:  # noqa: BLE001 - a setting the config refuses: an error row
                entries.append(Entry(m, {**s, "_error": f"{type(exc).__name__}: {exc}"}))
        per.append(entries)
    out: list[Entry] = []
    for i in range(max((len(e) for e in per), default=0)):
        out += [e[i] for e in per if i < len(e)]
    return out, notes


# ---- the measuring core ------------------------------------------------------------------------


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def work_skipped(method: str, stats: dict[str, Any]) -> tuple[float | None, str | None]:
    """(fraction of the method's work really skipped / merged, what it measures) from ``handle.stats``."""
    if method == "token_merge":
        v = stats.get("merge_ratio_effective")
        return (None if v is None else float(v)), "tokens_merged_fraction (merge_ratio_effective)"
    if method == "region_adaptive":
        v = stats.get("skipped_fraction")
        return (None if v is None else float(v)), "token_rows_reused_fraction (skipped_fraction)"
    if method == "sparse_attention":
        sparse = stats.get("attention_calls_sparse") or 0
        dense = stats.get("attention_calls_dense") or 0
        dens = stats.get("mean_density")
        if not sparse or dens is None:
            return (0.0 if dense else None), "attention_pairs_skipped_fraction (1 - mean_density)"
        return (1.0 - float(dens)) * sparse / (sparse + dense), "attention_pairs_skipped_fraction (1 - mean_density)"
    return None, None


class Bench:
    """One model; measures entries against its full-model baseline at one (steps, batch)."""

    def __init__(self, args: argparse.Namespace, name: str, device: torch.device, dtype: torch.dtype,
                 rows: list[dict[str, Any]], writer: Callable[[], None]) -> None:
        self.args, self.name, self.device, self.dtype = args, name, device, dtype
        self.rows, self.writer = rows, writer
        self.loaded = self._load()
        self.judge = self.judge_fn = self.judge_note = None
        if self.loaded.judge:
            try:
                from diffspeed.models.judge import judge_accuracy, load_judge

                self.judge = load_judge(self.loaded.judge, device=device)
                self.judge_fn = judge_accuracy
            except Exception as exc:  # noqa: BLE001 - optional metric
                self.judge_note = f"judge {self.loaded.judge!r} unavailable: {type(exc).__name__}: {exc}"

    def _load(self) -> Any:
        from diffspeed.models.loading import load_model

        loaded = load_model(self.name, device=self.device, dtype=self.dtype)
        loaded.transformer.eval()
        return loaded

    def setup(self, steps: int, batch: int) -> None:
        from diffspeed.bench.runner import _default_guidance, _device_name, _dtype_name

        k = self.loaded.num_classes
        self.steps, self.batch = steps, batch
        self.seeds = [self.args.seed + i for i in range(batch)]
        self.labels = [i % k for i in range(batch)] if k else list(range(batch))
        self.guidance = float(self.args.guidance if self.args.guidance is not None
                              else _default_guidance(self.loaded, self.labels, self.device))
        self.common = {
            "model": self.loaded.name, "device": str(self.device), "device_name": _device_name(self.device),
            "dtype": _dtype_name(self.dtype), "steps": steps, "batch": batch, "guidance_scale": self.guidance,
            "cfg_mode": self.args.cfg_mode, "seeds": [self.seeds[0], self.seeds[-1]],
        }
        self.base_out: torch.Tensor | None = None
        self.base_latency: float | None = None
        self.base_judge: float | None = None
        self.full_work: dict[str, int] | None = None
        self.jitter = 0.0

    def gen(self, target: Any = None) -> torch.Tensor:
        from diffspeed.sampler import generate

        return generate(target or self.loaded, self.labels, self.seeds, num_steps=self.steps,
                        guidance_scale=self.guidance, cfg_mode=self.args.cfg_mode)

    def new_row(self, entry: Entry) -> dict[str, Any]:
        row = {f: None for f in ROW_FIELDS}
        row.update(self.common)
        row.update({"method": entry.method, "is_method": entry.method != "full",
                    "settings": {k: v for k, v in entry.settings.items() if k != "_error"}, "notes": []})
        if self.judge_note:
            row["notes"].append(self.judge_note)
        return row

    def measure(self, entry: Entry) -> dict[str, Any]:
        from diffspeed.bench.metrics import psnr, rel_error, ssim
        from diffspeed.bench.peers import WorkCounter, skipped_fraction
        from diffspeed.bench.runner import RestorationError, _check_restored
        from diffspeed.bench.timing import time_callable
        from diffspeed.recipe import Recipe, apply_recipe

        is_full = entry.method == "full"
        row = self.new_row(entry)
        t_row = time.perf_counter()
        handle = None
        recipe = None
        try:
            if "_error" in entry.settings:
                raise RuntimeError(entry.settings["_error"])
            if not is_full:
                recipe = Recipe((entry.config,))
                handle = apply_recipe(self.loaded.transformer, recipe)
            counter = WorkCounter(self.loaded.transformer, self.loaded.adapter)
            try:
                first = self.gen()  # the counted warm-up generation
            finally:
                counter.remove()
            work = counter.counts()
            for _ in range(self.args.warmup - 1):
                self.gen()
            outputs: list[torch.Tensor] = []

            def run_once() -> None:
                outputs.append(self.gen())
                del outputs[:-2]

            timing = time_callable(run_once, warmup=0, repeats=self.args.repeats, device=self.device)
            out = outputs[-1]
            row["latency_ms"] = timing.median_ms
            row["latency_all_ms"] = timing.all_ms
            judge = None
            if self.judge is not None and self.judge_fn is not None:
                try:
                    judge = float(self.judge_fn(self.judge, out, list(self.labels)))
                except Exception as exc:  # noqa: BLE001 - optional metric
                    row["notes"].append(f"judge failed: {type(exc).__name__}: {exc}")
            row["judge_accuracy"] = judge
            if is_full:
                self.base_out, self.base_latency, self.full_work, self.base_judge = out, timing.median_ms, work, judge
                self.jitter = max((_max_abs_diff(o, out) for o in [first, *outputs]), default=0.0)
                if self.jitter > 0:
                    row["notes"].append(f"full model not bit-reproducible here (max abs diff {self.jitter:.3g})")
            assert self.base_out is not None and self.base_latency is not None
            row["full_judge_accuracy"] = self.base_judge
            row["speedup"] = self.base_latency / timing.median_ms if timing.median_ms > 0 else None
            identical = bool(torch.equal(out, self.base_out))
            row["identical"] = identical
            p = psnr(out, self.base_out)
            row["psnr_db"] = None if identical or not math.isfinite(p) else float(p)
            row["ssim"] = float(ssim(out, self.base_out)) if out.dim() in (4, 5) else None
            row["rel_error"] = float(rel_error(out, self.base_out))
            row["linear_rows_skipped_fraction"] = skipped_fraction(work, self.full_work)
            if is_full:
                row["work_skipped_fraction"] = 0.0
            if handle is not None:
                stats = handle.stats
                own = dict(stats.get(entry.method, stats))
                row["method_stats"] = own
                row["work_skipped_fraction"], row["work_measure"] = work_skipped(entry.method, own)
                if entry.method == "sparse_attention" and self.device.type == "cuda" \
                        and entry.settings.get("backend") != "flex":
                    row["notes"].append("sparse_attention on CUDA without the flex backend (reference path, host syncs)")
        except Exception as exc:  # noqa: BLE001 - one failing setting is a row, not a crash
            if is_full:
                raise
            row["error"] = f"{type(exc).__name__}: {exc}"
            if os.environ.get("TOKENS_TRACE"):
                traceback.print_exc(file=sys.stderr)
        finally:
            if handle is not None:
                try:
                    handle.remove()
                except Exception as exc:  # noqa: BLE001
                    row["error"] = (row["error"] + "; " if row["error"] else "") + f"remove failed: {type(exc).__name__}: {exc}"
        if is_full:
            row["restored"] = True
        elif recipe is not None and self.base_out is not None:
            # the runner's restore check: after remove() the output must be the full model's again
            try:
                row["restored"] = _check_restored(self.loaded, self.gen, self.base_out, self.jitter, recipe)
            except (RestorationError, Exception) as exc:  # noqa: BLE001
                row["restored"] = False
                row["error"] = (row["error"] + "; " if row["error"] else "") + f"not restored: {exc}"
                row["notes"].append("model reloaded after a failed restore check")
                self.loaded = self._load()
        row["row_s"] = round(time.perf_counter() - t_row, 3)
        self.rows.append(row)
        self.writer()
        return row


# ---- budget and the run ------------------------------------------------------------------------


def _log_row(row: dict[str, Any]) -> None:
    if row.get("error"):
        log(f"  {row['method']:<17} ERROR {str(row['error'])[:160]}")
        return
    psnr = "ident" if row.get("identical") else _f(row.get("psnr_db"), ".1f")
    log(f"  {row['method']:<17} {_short(row.get('settings')):<34} {_f(row.get('speedup'), '.2f')}x psnr {psnr} "
        f"ssim {_f(row.get('ssim'), '.3f')} judge {_f(row.get('judge_accuracy'), '.2f')} "
        f"skip {_f(_pct(row.get('work_skipped_fraction')), '.0f')}% restored={row.get('restored')}")


def run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, rows: list[dict[str, Any]],
        writer: Callable[[], None], budget: Budget) -> None:
    methods = [m for m in METHODS if m in _names(args.methods)]
    benches: dict[str, Bench] = {}
    for name in _names(args.models):
        if not budget.allows(f"load {name}", estimate_s=0.0):
            continue
        try:
            benches[name] = Bench(args, name, device, dtype, rows, writer)
        except Exception as exc:  # noqa: BLE001 - e.g. weights missing: an error row
            log(f"{name}: cannot load: {type(exc).__name__}: {exc}")
            row = {f: None for f in ROW_FIELDS}
            row.update({"model": name, "device": str(device), "method": "full", "is_method": False, "notes": [],
                        "steps": args.steps, "error": f"{type(exc).__name__}: {exc}"})
            rows.append(row)
            writer()
    # batch 1 of every model first, then the filling batches: a budget cut loses the big ones
    plan: list[tuple[int, str]] = []
    for name, bench in benches.items():
        for i, b in enumerate(batches_for(args, bench.loaded.is_video)):
            plan.append((i, name, b))  # type: ignore[arg-type]
    plan.sort(key=lambda t: t[0])
    for _, name, batch in plan:  # type: ignore[misc]
        bench = benches[name]
        label = f"{name} steps={args.steps} batch={batch}"
        if not budget.allows(f"{label} (all rows)"):
            log(f"budget: skip {label}")
            continue
        bench.setup(args.steps, batch)
        entries, notes = build_entries(methods, bench.loaded.transformer, bench.loaded.latent_shape,
                                       steps=args.steps, quick=args.quick, on_cuda=device.type == "cuda",
                                       sparse_backend=args.sparse_backend)
        for n in notes:
            log(f"{label}: {n}")
        t0 = time.perf_counter()
        try:
            full = bench.measure(Entry("full", {}))
        except Exception as exc:  # noqa: BLE001 - no baseline (e.g. out of memory): an error row
            log(f"{label}: full model failed: {type(exc).__name__}: {exc}")
            row = bench.new_row(Entry("full", {}))
            row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
            writer()
            _free(device)
            continue
        full["notes"] += notes
        budget.last_row_s = time.perf_counter() - t0
        log(f"{label}: full {full['latency_ms']:.1f} ms, judge {_f(full['judge_accuracy'], '.3f')}; "
            f"{len(entries)} method rows")
        for entry in entries:
            if not budget.allows(f"{label} {entry.method} {entry.settings}"):
                continue
            t0 = time.perf_counter()
            row = bench.measure(entry)
            # first sparse flex row compiles: do not let it inflate the estimate for ever
            budget.last_row_s = max(0.5 * budget.last_row_s, min(time.perf_counter() - t0, 4 * budget.last_row_s + 1))
            _log_row(row)
        if budget.allows(f"{label} final full timing", estimate_s=budget.last_row_s * 0.5):
            try:
                record_drift(full, bench.gen, args.repeats, device)
                writer()
            except Exception as exc:  # noqa: BLE001
                log(f"{label}: final full timing failed: {type(exc).__name__}: {exc}")
        _free(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- output ------------------------------------------------------------------------------------


def _pct(value: Any) -> float | None:
    return None if value is None else 100.0 * value


_ABBREV = {"ratio": "r", "reuse_steps": "reuse", "recompute_ratio": "rr", "full_every": "fe",
           "warmup_steps": "wu", "final_steps": "fin", "starvation_steps": "starve", "threshold": "thr",
           "local_window": "lw", "global_tokens": "gt", "backend": "", "block_size": "bs"}
_DEFAULTS = {"reuse_steps": 1, "full_every": 5, "warmup_steps": 4, "final_steps": 1, "starvation_steps": 4,
             "local_window": 0, "global_tokens": 0, "block_size": 64}


def _short(settings: Any) -> str:
    if not isinstance(settings, dict):
        return str(settings)
    parts = []
    for key, value in settings.items():
        if key not in _ABBREV or value is None or _DEFAULTS.get(key, object()) == value:
            continue
        text = f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(f"{_ABBREV[key]}={text}" if _ABBREV[key] else text)
    return " ".join(parts)[:34]


def _psnr_value(row: dict[str, Any]) -> float | None:
    return math.inf if row.get("identical") else row.get("psnr_db")


def _ok(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("is_method") and not r.get("error") and r.get("speedup") is not None]


def summarize(rows: Sequence[dict[str, Any]], budget: Budget, elapsed: float) -> dict[str, Any]:
    best = []
    for key in dict.fromkeys((r.get("model"), r.get("batch")) for r in rows if r.get("latency_ms") is not None):
        sub = [r for r in _ok(rows) if (r.get("model"), r.get("batch")) == key]
        full = next((r for r in rows if (r.get("model"), r.get("batch")) == key and r.get("method") == "full"), None)
        for m in METHODS:
            cands = [r for r in sub if r["method"] == m and (_psnr_value(r) or -1) >= PSNR_BAR]
            if not any(r["method"] == m for r in sub):
                continue
            b = max(cands, key=lambda r: r["speedup"]) if cands else None
            best.append({"model": key[0], "batch": key[1], "method": m,
                         "full_judge_accuracy": None if full is None else full.get("judge_accuracy"),
                         "best_at_bar": None if b is None else {
                             "settings": _short(b["settings"]), "speedup": round(b["speedup"], 3),
                             "psnr_db": None if b.get("identical") else round(b["psnr_db"], 2),
                             "judge_accuracy": b.get("judge_accuracy"),
                             "work_skipped_fraction": b.get("work_skipped_fraction")}})
    return {"summary": "tokens", "psnr_bar_db": PSNR_BAR, "best": best, "rows": len(rows),
            "method_rows": sum(1 for r in rows if r.get("is_method")),
            "errors": sum(1 for r in rows if r.get("error")),
            "not_restored": sum(1 for r in rows if r.get("restored") is False),
            "truncated": budget.truncated, "skipped": len(budget.skipped), "elapsed_s": round(elapsed, 1)}


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    keys = list(dict.fromkeys((r.get("model"), r.get("steps"), r.get("batch")) for r in rows))
    for model, steps, batch in keys:
        sub = [r for r in rows if (r.get("model"), r.get("steps"), r.get("batch")) == (model, steps, batch)]
        print(f"\n== {model}  steps={steps}  batch={batch}")
        print(f"{'method':<17} {'settings':<34} {'ms':>9} {'speedup':>7} {'psnr':>6} {'ssim':>6} {'judge':>5} "
              f"{'skip%':>5} {'rows%':>5}")
        for r in sub:
            if r.get("error"):
                print(f"{r['method']:<17} {_short(r.get('settings')):<34} ERROR {str(r['error'])[:70]}")
                continue
            psnr = "ident" if r.get("identical") else _f(r.get("psnr_db"), ".1f")
            print(f"{r['method']:<17} {_short(r.get('settings')):<34} {_f(r.get('latency_ms'), '.1f'):>9} "
                  f"{_f(r.get('speedup'), '.2f'):>7} {psnr:>6} {_f(r.get('ssim'), '.3f'):>6} "
                  f"{_f(r.get('judge_accuracy'), '.2f'):>5} {_f(_pct(r.get('work_skipped_fraction')), '.0f'):>5} "
                  f"{_f(_pct(r.get('linear_rows_skipped_fraction')), '.0f'):>5}")
    print("  (skip% = work skipped as counted by the method; rows% = token rows not run through the linears)")


def plot_png(rows: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Speedup vs PSNR, one panel per model; colour = method, marker = batch, lines = Pareto frontiers."""
    from diffspeed.bench.plots import pareto_frontier
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(r["model"] for r in _ok(rows)))
    if not models:
        return None
    fig = Figure(figsize=(6.5 * len(models), 4.8), dpi=110)
    FigureCanvasAgg(fig)
    colors = {"token_merge": "tab:blue", "region_adaptive": "tab:green", "sparse_attention": "tab:red"}
    markers = ["o", "s", "^", "D"]
    for i, model in enumerate(models):
        ax = fig.add_subplot(1, len(models), i + 1)
        sub = [r for r in _ok(rows) if r["model"] == model]
        batches = sorted({r["batch"] for r in sub})
        for m in METHODS:
            for bi, b in enumerate(batches):
                pts = []
                for r in sub:
                    if r["method"] != m or r["batch"] != b:
                        continue
                    y = _psnr_value(r)
                    if y is not None:
                        pts.append((r["speedup"], min(y, IDENTICAL_PSNR)))
                if pts:
                    ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[bi % 4], s=26, alpha=0.8,
                               edgecolors=colors[m], facecolors=colors[m] if bi == 0 else "none", label=f"{m} b{b}")
                    front = pareto_frontier(pts)  # the method's frontier at this batch
                    ax.plot([p[0] for p in front], [p[1] for p in front], color=colors[m], alpha=0.6,
                            linestyle="-" if bi == 0 else "--", linewidth=1.1)
        ax.axhline(PSNR_BAR, color="grey", linewidth=0.8, linestyle=":")
        ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
        steps = sub[0].get("steps") if sub else "?"
        dev = sub[0].get("device_name") if sub else ""
        ax.set_title(f"{model}, {steps} steps ({dev})", fontsize=10)
        ax.set_xlabel("speedup vs full model (x)")
        ax.set_ylabel(f"PSNR vs full model (dB; identical = {IDENTICAL_PSNR:g})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def write_result(meta: dict[str, Any], rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """``{"meta": ..., "rows": [...]}`` written atomically (non-finite numbers as null)."""
    from diffspeed.bench.runner import to_jsonable

    p = Path(path)
    text = json.dumps(to_jsonable({"meta": meta, "rows": list(rows)}), indent=2, allow_nan=False) + "\n"
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


def _meta(args: argparse.Namespace, argv: Sequence[str], device: torch.device, budget: Budget) -> dict[str, Any]:
    from diffspeed.bench.runner import _device_name

    try:
        import diffusers

        dver = diffusers.__version__
    except Exception:  # noqa: BLE001
        dver = None
    return {
        "benchmark": "tokens", "device": str(device), "device_name": _device_name(device),
        "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": dver, "python": platform.python_version(),
        "command": " ".join(["python", "benchmarks/tokens.py", *argv]), "argv": list(argv),
        "models": _names(args.models), "methods": _names(args.methods), "steps": args.steps,
        "batches": args.batches, "warmup": args.warmup, "repeats": args.repeats,
        "budget_s": args.budget_s, "hard_limit_s": args.hard_limit_s,
        "truncated": budget.truncated, "skipped": list(budget.skipped),
        "elapsed_s": round(time.perf_counter() - _T0, 1), "psnr_bar_db": PSNR_BAR,
    }


# ---- main --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    dtype = getattr(torch, args.dtype)
    rows: list[dict[str, Any]] = []
    budget = Budget(args.budget_s, _T0)
    lock = threading.Lock()

    def writer() -> None:
        with lock:
            write_result(_meta(args, argv, device, budget), list(rows), args.out)

    finish = budget_finisher(
        budget, writer, plot=(lambda: plot_png(rows, args.plot)) if args.plot else None,
        table=lambda: print_table(rows), summary=lambda: summarize(rows, budget, time.perf_counter() - _T0), log=log)

    timer = start_watchdog(args.hard_limit_s, _T0, finish, log)
    log(f"device {device}, dtype {args.dtype}, models {args.models}, methods {args.methods}, steps {args.steps}, "
        f"batches {args.batches}")
    try:
        run(args, device, dtype, rows, writer, budget)
    finally:
        timer.cancel()
        finish(False)
    if budget.skipped:
        log(f"budget: {len(budget.skipped)} row(s) skipped, e.g. {budget.skipped[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
