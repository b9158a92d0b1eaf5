#!/usr/bin/env python
"""Caching methods side by side: diffspeed's own vs the peers, same weights, seeds, sampler, device.

For each model (default ``reference-image`` and ``reference-video``, the trained reference models;
``--models tiny-dit,tiny-wan`` for a CPU smoke run), each step count (``--steps``, default 25,50)
and each batch (image: 1 and 64, video: 1 and 8) it measures, with the same seeds and labels:

1. the full model (the baseline of ``speedup`` and of the fidelity metrics);
2. diffspeed's methods over a threshold sweep: ``step_cache`` (thresholds 0.05..0.4) and
   ``block_cache`` (thresholds 0.04..0.3, F1B0 and F2B1, taylor_order 0/1/2); ``erta_cache``
   (after ``diffspeed.calibrate.calibrate_erta`` at the same steps, JSON in a temp file) and
   ``motion_cache`` (video only) when ``diffspeed.methods`` exports them;
3. every peer of :mod:`diffspeed.bench.peers` at its documented recommended settings, then its
   sweep (MagCache first runs diffusers' own calibration mode on other seeds).

Per row: ``model, device, device_name, dtype, steps, batch, cfg_mode, guidance_scale, method, peer
(bool), family, variant ("full" / "recommended" / "sweep"), settings, latency_ms, latency_all_ms,
speedup, psnr_db, identical, ssim, rel_error, judge_accuracy, skipped_fraction,
skipped_attention_fraction, skipped_mlp_fraction, work (raw counts), restored, notes, error``.

* ``skipped_fraction`` is *measured*, identically for ours and the peers: forward pre-hooks on the
  leaf linears that only run when the work runs (``to_q`` of every attention module and the last
  linear of every block) count executed token rows during one generation; the fraction is
  ``1 - executed / full model's`` (:class:`diffspeed.bench.peers.WorkCounter`). A hook that silently
  does nothing shows 0.
* Timing: the counted generation is the first warm-up; then ``--repeats`` generations (denoising
  loop + decoding), each timed with CUDA events on a GPU (``diffspeed.bench.timing.time_callable``),
  median. ``psnr_db`` is ``null`` when the output is bit-identical (``identical: true``).
* After each method is removed, one more generation must match the full model (bit-identical, or
  within the full model's own run-to-run jitter): ``restored``. If not, the model is reloaded.
* The full model is timed again after a configuration's last row: the full row's ``latency_end_ms``
  and ``drift_pct`` say how much the machine drifted meanwhile (summary: ``max_drift_pct``).
* Errors (a peer that cannot run on a model class, a failing calibration) become rows with ``error``.

The ``overhead`` stage measures what each method costs when it never skips (threshold ~1e-9, or
the peer's "always compute" setting) on a real-size random-weight DiT-XL/2 (bf16, batch 8, 10
steps; ``tiny-dit`` on a CPU): rows with ``method = "<name>_overhead"``, ``overhead_pct`` (latency vs
the full model, in %) and ``per_step_overhead_ms``; the full model is timed right before and after each method (compared
with their mean) and ``noise_pct`` = their gap: an ``overhead_pct`` within it is not resolved
(``overhead_resolved: false``).

Outputs: ``--out`` JSON (a list of rows, rewritten after every row, non-finite numbers as null),
``--plot`` a Pareto PNG (speedup vs PSNR, ours vs peers, one panel per model and step count), a
compact table (per configuration: each method's fastest row at PSNR >= 30 dB) and, last, one JSON
line: the best of ours vs the best peer at PSNR >= 30 dB per configuration and their speedup ratio.

``--budget-s`` (seconds from process start) stops starting new rows when the next one would not
fit; ``--hard-limit-s`` is a watchdog that writes what was measured and exits 0. Both leave
``partial: true`` in the summary.

Usage on the GPU machine (diffusers and cache-dit come as wheels in ``.whl/``, carried; cache-dit
needs nothing else that machine lacks). One command per step count keeps each under 9 minutes on an
H100 (about 90 rows per model/steps/batch, 5 generations each, plus calibrations)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:src python3 benchmarks/caching.py --models reference-image --steps 25 \\
        --stages image,overhead --out $OUT/caching.json --plot $OUT/caching.png
    # then: --models reference-image --steps 50 --stages image
    #       --models reference-video --steps 25 --stages video
    #       --models reference-video --steps 50 --stages video

CPU smoke (tests)::

    PYTHONPATH=src python benchmarks/caching.py --models tiny-dit --steps 6 --batches 1 --quick \\
        --out /tmp/c.json --plot /tmp/c.png
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # budgets count from process start, imports included

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")

import torch  # noqa: E402

from diffspeed.bench.script import Budget, budget_finisher, fmt as _f, record_drift, start_watchdog  # noqa: E402

PSNR_BAR = 30.0  # dB: the fidelity bar of the summary
IDENTICAL_PSNR = 100.0  # where bit-identical outputs are drawn in the plot

ROW_FIELDS = (
    "model", "device", "device_name", "dtype", "steps", "batch", "cfg_mode", "guidance_scale", "method", "peer",
    "family", "variant", "settings", "latency_ms", "latency_all_ms", "speedup", "psnr_db", "identical", "ssim",
    "rel_error", "judge_accuracy", "skipped_fraction", "skipped_attention_fraction", "skipped_mlp_fraction",
    "work", "method_stats", "restored", "notes", "error",
)


def log(msg: str) -> None:
    print(f"[caching {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ---- arguments ---------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in str(text).split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="reference-image,reference-video")
    p.add_argument("--steps", default="25,50", help="comma-separated step counts")
    p.add_argument("--batches", default=None, help="batches for every model (overrides --image/--video-batches)")
    p.add_argument("--image-batches", default="1,64")
    p.add_argument("--video-batches", default="1,8")
    p.add_argument("--stages", default="image,video,overhead", help="any of image,video,overhead")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="float32", help="dtype of the measured models (overhead: bfloat16 on cuda)")
    p.add_argument("--cfg-mode", default="batched", choices=("batched", "separate"))
    p.add_argument("--guidance", type=float, default=None, help="default: the model's (4.0 with an uncond branch)")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations; the first one is counted")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="seeds are seed..seed+batch-1")
    p.add_argument("--quick", action="store_true", help="a few settings per method, 1 repeat (smoke runs)")
    p.add_argument("--peers", default=None, help="comma-separated peer names (default: all)")
    p.add_argument("--ours", default=None, help="comma-separated: step_cache,block_cache,erta_cache,motion_cache")
    p.add_argument("--no-sweep", action="store_true", help="recommended settings only (ours: one setting each)")
    p.add_argument("--ours-grid", default=None,
                   help='JSON {"method": [settings, ...]}: these settings replace the sweep of the methods named '
                        '(e.g. {"erta_cache": [{"calibration_threshold": 0.4, "calibration_max_consecutive": 4}]})')
    p.add_argument("--peers-grid", default=None,
                   help='JSON {"peer": [settings, ...]}: these settings (over the peer\'s recommended ones) replace its '
                        'sweep (e.g. {"magcache": [{"threshold": 0.24, "max_skip_steps": 6}]}); its recommended row stays')
    p.add_argument("--overhead-model", default=None, help="default: dit-xl-2 on cuda, tiny-dit on cpu")
    p.add_argument("--overhead-batch", type=int, default=None, help="default 8 (2 on cpu)")
    p.add_argument("--overhead-steps", type=int, default=None, help="default 10 (4 with --quick)")
    p.add_argument("--overhead-repeats", type=int, default=None, help="default 5 (1 with --quick)")
    p.add_argument("--budget-s", type=float, default=480.0, help="no new row after this (from process start)")
    p.add_argument("--hard-limit-s", type=float, default=540.0, help="watchdog: write and exit 0")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="benchmarks/results/caching.json")
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first warm-up generation is the counted one)")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


# ---- configurations ----------------------------------------------------------------------------


@dataclasses.dataclass
class Entry:
    """One thing to measure: the full model, one of ours, or one peer setting."""

    method: str
    peer: bool
    family: str
    variant: str
    settings: dict[str, Any]
    config: Any = None  # ours: a MethodConfig
    peer_obj: Any = None  # peers: a PeerMethod


def _config_settings(cfg: Any) -> dict[str, Any]:
    data = cfg.to_dict()
    data.pop("method", None)
    return data


def our_entries(is_video: bool, n_blocks: int, quick: bool, no_sweep: bool, only: list[str] | None) -> list[Entry]:
    from diffspeed.methods import BlockCacheConfig, StepCacheConfig

    out: list[Entry] = []

    def want(name: str) -> bool:
        return only is None or name in only

    if want("step_cache"):
        thresholds = (0.2,) if quick or no_sweep else (0.05, 0.1, 0.15, 0.2, 0.3, 0.4)
        for t in thresholds:
            cfg = StepCacheConfig(threshold=t)
            out.append(Entry("step_cache", False, "diffspeed", "sweep", _config_settings(cfg), config=cfg))
    if want("block_cache"):
        if quick or no_sweep:
            grid = [(0.15, 1, 0, 0), (0.15, 1, 0, 1)]
            if n_blocks >= 4:
                grid.append((0.15, 2, 1, 1))
        else:
            grid = [(t, fn, bn, order) for fn, bn in ((1, 0), (2, 1)) for order in (0, 1, 2)
                    for t in (0.04, 0.08, 0.15, 0.3)]
        for t, fn, bn, order in grid:
            cfg = BlockCacheConfig(threshold=t, front_blocks=fn, back_blocks=bn, taylor_order=order)
            out.append(Entry("block_cache", False, "diffspeed", "sweep", _config_settings(cfg), config=cfg))
    import diffspeed.methods as methods

    erta_cls = getattr(methods, "ErtaCacheConfig", None)
    if erta_cls is not None and want("erta_cache"):
        # ERTACache's speed knob is the threshold of its offline calibration (the static schedule)
        # 0.25 and 0.35: at 25 steps the schedules jump from 56% to 64% skipped between 0.2 and 0.3
        for t in (0.15,) if quick or no_sweep else (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4):
            out.append(Entry("erta_cache", False, "diffspeed", "sweep",
                             {"calibration_threshold": t, "use_timestep_adjust": True, "use_residual_correction": True},
                             config=erta_cls))
        # the same method with its schedule ranked by measured reuse cost, at fixed reuse fractions
        for f in () if quick or no_sweep else (0.56, 0.6, 0.64, 0.68, 0.72):
            out.append(Entry("erta_cache", False, "diffspeed", "reuse-cost",
                             {"calibration_reuse_fraction": f, "use_timestep_adjust": True,
                              "use_residual_correction": True}, config=erta_cls))
        # longer reuse runs (calibration max_consecutive 4-6) and CFG branch-difference reuse on computed steps
        for extra in () if quick or no_sweep else (
                {"calibration_threshold": 0.3, "calibration_max_consecutive": 4},
                {"calibration_threshold": 0.4, "calibration_max_consecutive": 4},
                {"calibration_threshold": 0.5, "calibration_max_consecutive": 4},
                {"calibration_threshold": 0.25, "calibration_max_consecutive": 5},
                {"calibration_threshold": 0.25, "calibration_max_consecutive": 6},
                {"calibration_threshold": 0.3, "calibration_max_consecutive": 6},
                {"calibration_threshold": 0.3, "calibration_guidance_threshold": 0.05},
                {"calibration_threshold": 0.3, "calibration_guidance_threshold": 0.1}):
            out.append(Entry("erta_cache", False, "diffspeed", "sweep",
                             {**extra, "use_timestep_adjust": True, "use_residual_correction": True}, config=erta_cls))
    motion_cls = getattr(methods, "MotionCacheConfig", None)
    if motion_cls is not None and is_video and want("motion_cache"):
        grid = [{}] if quick or no_sweep else [{"recompute_ratio": r} for r in (0.75, 0.5, 0.35, 0.25)] + [
            {"recompute_ratio": 0.35, "full_every": 8}] + [
            # idle steps (no token due: no block runs); max_age raised so that static tokens wait for full steps
            {"recompute_ratio": r, "idle_steps": i, "full_every": f, "max_age": 4 * (i + 1)}
            for r, i, f in ((0.35, 1, 3), (0.25, 1, 3), (0.35, 1, 4), (0.2, 1, 4), (0.5, 2, 3))]
        for s in grid:
            try:
                cfg = motion_cls(**s)
                out.append(Entry("motion_cache", False, "diffspeed", "sweep", _config_settings(cfg), config=cfg))
            except Exception as exc:  # noqa: BLE001 - a config this script guessed wrong: an error row
                out.append(Entry("motion_cache", False, "diffspeed", "sweep", {**s, "_error": f"{type(exc).__name__}: {exc}"}))
    return out


def grid_entries(ours: list[Entry], grid: dict[str, list[dict[str, Any]]]) -> list[Entry]:
    """``ours`` with the entries of each method named in ``grid`` replaced by one entry per given setting."""
    from diffspeed.errors import DiffspeedError
    from diffspeed.methods.base import config_class

    out = [e for e in ours if e.method not in grid]
    for method, settings_list in grid.items():
        try:
            cls = config_class(method)
        except DiffspeedError as exc:
            raise SystemExit(f"--ours-grid: {exc}") from None
        for settings in settings_list:
            if method == "erta_cache":  # configured per calibration in Bench._apply
                out.append(Entry(method, False, "diffspeed", "grid", {"use_timestep_adjust": True,
                                 "use_residual_correction": True, **settings}, config=cls))
            else:
                cfg = cls(**settings)
                out.append(Entry(method, False, "diffspeed", "grid", _config_settings(cfg), config=cfg))
    return out


def peer_entries(quick: bool, no_sweep: bool, only: list[str] | None,
                 grid: dict[str, list[dict[str, Any]]] | None = None) -> list[Entry]:
    """The peers' recommended settings and sweeps; ``grid`` replaces the sweep of the peers it names."""
    from diffspeed.bench.peers import PEERS

    unknown = sorted(set(grid or {}) - set(PEERS))
    if unknown:
        raise SystemExit(f"--peers-grid: unknown peer(s) {unknown}; known: {sorted(PEERS)}")
    out = []
    for name, peer in PEERS.items():
        if only is not None and name not in only:
            continue
        out.append(Entry(name, True, peer.family, "recommended", dict(peer.recommended), peer_obj=peer))
        if grid and name in grid:
            variant, sweep = "grid", grid[name]
        else:
            variant, sweep = "sweep", [] if no_sweep else (peer.sweep[:1] if quick else peer.sweep)
        for s in sweep:
            out.append(Entry(name, True, peer.family, variant, {**peer.recommended, **s}, peer_obj=peer))
    return out


# ---- the measuring core ------------------------------------------------------------------------


class Bench:
    """Holds the model of one configuration and measures entries against its full-model baseline."""

    def __init__(self, args: argparse.Namespace, model_name: str, device: torch.device, dtype: torch.dtype,
                 rows: list[dict[str, Any]], writer: Callable[[], None]) -> None:
        self.args = args
        self.model_name = model_name
        self.device = device
        self.dtype = dtype
        self.rows = rows
        self.writer = writer
        self.loaded = self._load()
        self.judge = None
        self.judge_fn = None
        self.judge_note = None
        self.calibrations: dict[tuple[Any, ...], Any] = {}  # (steps, cfg_mode, guidance, what) -> result
        self._load_judge()

    def _load(self) -> Any:
        from diffspeed.models.loading import load_model

        loaded = load_model(self.model_name, device=self.device, dtype=self.dtype)
        loaded.transformer.eval()
        return loaded

    def _load_judge(self) -> None:
        if not self.loaded.judge:
            return
        try:
            from diffspeed.models.judge import judge_accuracy, load_judge

            self.judge = load_judge(self.loaded.judge, device=self.device)
            self.judge_fn = judge_accuracy
        except Exception as exc:  # noqa: BLE001 - optional metric (ImportError, weights not shipped, ...)
            self.judge_note = f"judge {self.loaded.judge!r} unavailable: {type(exc).__name__}: {exc}"

    # ---- one configuration (steps, batch) ----
    def setup(self, steps: int, batch: int, guidance: float | None = None, cfg_mode: str | None = None) -> None:
        from diffspeed.bench.peers import RunInfo
        from diffspeed.bench.runner import _default_guidance, _device_name, _dtype_name

        loaded = self.loaded
        k = loaded.num_classes
        self.steps, self.batch = steps, batch
        self.seeds = [self.args.seed + i for i in range(batch)]
        self.labels = [i % k for i in range(batch)] if k else list(range(batch))
        # calibrations (MagCache, ERTACache) run on 4 other samples, shared by every batch at this step count
        self.calib_seeds = [10_000 + self.args.seed + i for i in range(4)]
        self.calib_labels = [i % k for i in range(4)] if k else list(range(4))
        self.cfg_mode = cfg_mode or self.args.cfg_mode
        self.guidance = float(guidance if guidance is not None else (
            self.args.guidance if self.args.guidance is not None else _default_guidance(loaded, self.labels, self.device)))
        self.run = RunInfo(steps, self.cfg_mode, self.guidance)
        self.common = {
            "model": loaded.name, "device": str(self.device), "device_name": _device_name(self.device),
            "dtype": _dtype_name(self.dtype), "steps": steps, "batch": batch, "cfg_mode": self.cfg_mode,
            "guidance_scale": self.guidance,
        }
        self.base_out: torch.Tensor | None = None
        self.base_latency: float | None = None
        self.full_work: dict[str, int] | None = None
        self.jitter = 0.0

    def gen(self) -> torch.Tensor:
        from diffspeed.sampler import generate

        return generate(self.loaded, self.labels, self.seeds, num_steps=self.steps, guidance_scale=self.guidance,
                        cfg_mode=self.cfg_mode)

    def new_row(self, entry: Entry) -> dict[str, Any]:
        row = {f: None for f in ROW_FIELDS}
        row.update(self.common)
        row.update({"method": entry.method, "peer": entry.peer, "family": entry.family, "variant": entry.variant,
                    "settings": _jsonable_settings(entry.settings), "notes": [], "work": None, "method_stats": None})
        if self.judge_note:
            row["notes"].append(self.judge_note)
        return row

    def _apply(self, entry: Entry, row: dict[str, Any]) -> Any:
        """Apply an entry; returns an object with ``remove()`` (None for the full model)."""
        transformer = self.loaded.transformer
        if entry.method == "full":
            return None
        if entry.peer:
            peer = entry.peer_obj
            settings = dict(entry.settings)
            if peer.calibrate_fn is not None:
                cal = self._calibration(entry.method, lambda: peer.calibrate(
                    self.loaded, self.run, self.calib_labels, self.calib_seeds))
                settings.update(cal)
                row["notes"].append(f"{entry.method} calibrated by its own calibration mode on seeds {self.calib_seeds}")
            handle = peer.apply(transformer, settings, self.run, count=False)
            row["notes"] += handle.notes
            return handle
        from diffspeed.recipe import Recipe, apply_recipe

        if "_error" in entry.settings:
            raise RuntimeError(entry.settings["_error"])
        cfg = entry.config
        if entry.method == "erta_cache":
            t = entry.settings.get("calibration_threshold")
            frac = entry.settings.get("calibration_reuse_fraction")
            k = None if frac is None else max(1, round(frac * self.steps))
            names = ("max_consecutive", "guidance_threshold", "correction", "correction_order")
            extra = {name: entry.settings[f"calibration_{name}"] for name in names
                     if entry.settings.get(f"calibration_{name}") is not None}
            what = (f"erta_cache@{t}" if k is None else f"erta_cache@reuse{k}") + "".join(
                f",{name}={value}" for name, value in sorted(extra.items()))
            path = self._calibration(what, lambda: self._calibrate_erta(t, k, extra))
            cfg = _erta_config(entry.config, path, entry.settings)
            row["settings"] = _jsonable_settings({**entry.settings, **_config_settings(cfg)})
            from diffspeed.calibrate import load_calibration

            # the request stays in the settings; what the file holds after its validation is recorded beside it
            calib = load_calibration(path)
            row["settings"]["calibration_kept_correction"] = (
                f"{calib.get('residual_correction', 'scalar')}/{calib['calibration'].get('correction_order', 1)}"
                f"/{(calib['stats'].get('validation') or {}).get('kept', 'unvalidated')}")
            how = (f"threshold={t}" if k is None else f"reuse_steps={k} (ranked by measured reuse cost)") + "".join(
                f", {name}={value}" for name, value in sorted(extra.items()))
            row["notes"].append(f"erta_cache calibrated by diffspeed.calibrate.calibrate_erta({how}) on seeds "
                                f"{self.calib_seeds}")
        return apply_recipe(transformer, Recipe((cfg,)))

    def _calibration(self, what: str, fn: Callable[[], Any]) -> Any:
        key = (self.steps, self.cfg_mode, self.guidance, what)
        if key not in self.calibrations:
            try:
                self.calibrations[key] = ("ok", fn())
            except Exception as exc:  # noqa: BLE001
                self.calibrations[key] = ("error", f"calibration failed: {type(exc).__name__}: {exc}")
        status, value = self.calibrations[key]
        if status == "error":
            raise RuntimeError(value)
        return value

    def _calibrate_erta(self, threshold: float | None, reuse_steps: int | None = None,
                        extra: dict[str, Any] | None = None) -> str:
        """Run ``calibrate_erta`` at this configuration's steps (other seeds); the JSON goes to a temp file."""
        import diffspeed.calibrate as calibrate

        fd, path = tempfile.mkstemp(prefix="erta_", suffix=".json", dir=_calib_dir())
        os.close(fd)
        available = {
            "loaded": self.loaded, "num_steps": self.steps, "steps": self.steps, "seeds": self.calib_seeds,
            "labels": self.calib_labels, "guidance_scale": self.guidance, "device": self.device,
        }
        if threshold is not None:
            available["threshold"] = threshold
        if reuse_steps is not None:
            available["reuse_steps"] = reuse_steps
        available.update(extra or {})
        result = _call_flexible(calibrate.calibrate_erta, available)
        if isinstance(result, (str, os.PathLike)) and Path(result).is_file():
            return str(result)
        save = getattr(calibrate, "save_calibration", None)
        if save is not None and isinstance(result, dict):
            save(result, path)
        else:
            data = result
            for attr in ("to_dict", "as_dict"):
                if hasattr(result, attr):
                    data = getattr(result, attr)()
                    break
            Path(path).write_text(json.dumps(data, default=_json_default))
        if not Path(path).is_file() or Path(path).stat().st_size == 0:
            raise RuntimeError("calibrate_erta returned nothing usable")
        return path

    def measure(self, entry: Entry, *, repeats: int | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        from diffspeed.bench.metrics import psnr, rel_error, ssim
        from diffspeed.bench.peers import WorkCounter, skipped_fraction
        from diffspeed.bench.timing import time_callable

        repeats = repeats or self.args.repeats
        is_full = entry.method == "full"
        row = self.new_row(entry)
        if extra:
            row.update(extra)
        t_row = time.perf_counter()
        handle = None
        try:
            handle = self._apply(entry, row)
            counter = WorkCounter(self.loaded.transformer)
            try:
                first = self.gen()  # the counted warm-up generation
            finally:
                counter.remove()
            work = counter.counts()
            row["work"] = work
            for _ in range(self.args.warmup - 1):
                self.gen()
            outputs: list[torch.Tensor] = []

            def once() -> None:
                outputs.append(self.gen())
                del outputs[:-2]

            timing = time_callable(once, warmup=0, repeats=repeats, device=self.device)
            out = outputs[-1]
            row["latency_ms"] = timing.median_ms
            row["latency_all_ms"] = timing.all_ms
            if is_full:
                self.base_out = out
                self.base_latency = timing.median_ms
                self.full_work = work
                self.jitter = max((_max_abs_diff(o, out) for o in [first, *outputs]), default=0.0)
                if self.jitter > 0:
                    row["notes"].append(f"full model not bit-reproducible here (max abs diff {self.jitter:.3g})")
            assert self.base_out is not None and self.base_latency is not None
            row["speedup"] = self.base_latency / timing.median_ms if timing.median_ms > 0 else None
            identical = bool(torch.equal(out, self.base_out))
            row["identical"] = identical
            p = psnr(out, self.base_out)
            row["psnr_db"] = None if identical or not math.isfinite(p) else p
            row["ssim"] = ssim(out, self.base_out) if out.dim() in (4, 5) else None
            row["rel_error"] = rel_error(out, self.base_out)
            row["skipped_fraction"] = skipped_fraction(work, self.full_work)
            row["skipped_attention_fraction"] = skipped_fraction(work, self.full_work, "attn")
            row["skipped_mlp_fraction"] = skipped_fraction(work, self.full_work, "mlp")
            if self.judge is not None and self.judge_fn is not None:
                try:
                    row["judge_accuracy"] = float(self.judge_fn(self.judge, out, list(self.labels)))
                except Exception as exc:  # noqa: BLE001 - optional metric
                    row["notes"].append(f"judge failed: {type(exc).__name__}: {exc}")
            if handle is not None and not entry.peer:
                row["method_stats"] = dict(getattr(handle, "stats", {}) or {})
        except Exception as exc:  # noqa: BLE001 - any failure of one method is a row, not a crash
            if is_full:
                raise
            row["error"] = f"{type(exc).__name__}: {exc}"
            if os.environ.get("CACHING_TRACE"):
                traceback.print_exc(file=sys.stderr)
        finally:
            if handle is not None:
                try:
                    handle.remove()
                except Exception as exc:  # noqa: BLE001
                    row["error"] = (row["error"] + "; " if row["error"] else "") + f"remove failed: {type(exc).__name__}: {exc}"
                if entry.peer:
                    if handle.reported:
                        row["method_stats"] = dict(handle.reported)
                    row["notes"] += [n for n in handle.notes if n not in row["notes"]]
        if is_full:
            row["restored"] = True
        elif handle is not None or row["error"] is not None:
            row["restored"] = self._check_restored(row)
        row["row_s"] = round(time.perf_counter() - t_row, 3)
        self.rows.append(row)
        self.writer()
        return row

    def _check_restored(self, row: dict[str, Any]) -> bool:
        from diffspeed.methods.base import applied_methods

        ok = False
        try:
            left = applied_methods(self.loaded.transformer)
            after = self.gen()
            assert self.base_out is not None
            ok = not left and (torch.equal(after, self.base_out)
                               or (self.jitter > 0 and _max_abs_diff(after, self.base_out) <= 2 * self.jitter))
            if not ok:
                row["notes"].append(f"model not restored (methods left: {sorted(left)}; max abs diff "
                                    f"{_max_abs_diff(after, self.base_out):.3g}): reloaded")
        except Exception as exc:  # noqa: BLE001
            row["notes"].append(f"restoration check failed: {type(exc).__name__}: {exc}; reloaded")
        if not ok:
            self.loaded = self._load()
        return ok


_CALIB_DIR: list[str] = []


def _calib_dir() -> str:
    """A temp folder for calibration files of this run (removed at the end of main)."""
    if not _CALIB_DIR:
        _CALIB_DIR.append(tempfile.mkdtemp(prefix="caching_calib_"))
    return _CALIB_DIR[0]


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    return str(value)


def _jsonable_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(settings, default=_json_default))


def _call_flexible(fn: Callable[..., Any], available: dict[str, Any]) -> Any:
    """Call ``fn`` with the arguments it names out of ``available`` (required ones must be there)."""
    sig = inspect.signature(fn)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for name, param in sig.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name in available:
            if param.kind == param.POSITIONAL_ONLY:
                args.append(available[name])
            else:
                kwargs[name] = available[name]
        elif param.default is param.empty:
            if not args and not kwargs and param.kind != param.KEYWORD_ONLY:
                args.append(available["loaded"])  # the first required argument: the model
            else:
                raise TypeError(f"{fn.__name__} needs an argument {name!r} this benchmark does not know")
    return fn(*args, **kwargs)


def _erta_config(cls: Any, path: str, settings: dict[str, Any]) -> Any:
    fields = [f.name for f in dataclasses.fields(cls)]
    kwargs = {k: v for k, v in settings.items() if k in fields}
    target = "calibration" if "calibration" in fields else next(
        (n for n in fields if any(w in n.lower() for w in ("path", "file", "calib", "json"))), None)
    if target is None:
        raise RuntimeError(f"ErtaCacheConfig has no field for the calibration file (fields: {fields})")
    kwargs[target] = path
    return cls(**kwargs)


# ---- stages ------------------------------------------------------------------------------------


def run_model(args: argparse.Namespace, name: str, device: torch.device, dtype: torch.dtype,
              rows: list[dict[str, Any]], writer: Callable[[], None], budget: Budget, stages: set[str]) -> None:
    try:
        bench = Bench(args, name, device, dtype, rows, writer)
    except Exception as exc:  # noqa: BLE001 - e.g. reference weights not trained yet
        log(f"{name}: cannot load: {type(exc).__name__}: {exc}")
        row = {f: None for f in ROW_FIELDS}
        row.update({"model": name, "device": str(device), "method": "full", "peer": False, "notes": [],
                    "error": f"{type(exc).__name__}: {exc}"})
        rows.append(row)
        writer()
        return
    stage = "video" if bench.loaded.is_video else "image"
    if stage not in stages:
        log(f"{name}: stage {stage!r} not selected, skipped")
        return
    if args.batches:
        batches = _ints(args.batches)
    else:
        batches = _ints(args.video_batches if stage == "video" else args.image_batches)
    from diffspeed.adapters import get_adapter

    n_blocks = len(get_adapter(bench.loaded.transformer).blocks(bench.loaded.transformer))
    ours = our_entries(bench.loaded.is_video, n_blocks, args.quick, args.no_sweep, _names(args.ours) if args.ours else None)
    if args.ours_grid:
        ours = grid_entries(ours, json.loads(args.ours_grid))
    peers = peer_entries(args.quick, args.no_sweep, _names(args.peers) if args.peers else None,
                         json.loads(args.peers_grid) if args.peers_grid else None)
    for steps in _ints(args.steps):
        for batch in batches:
            label = f"{name} steps={steps} batch={batch}"
            if not budget.allows(f"{label} (all rows)"):
                log(f"budget: skip {label}")
                continue
            log(f"{label}: full model")
            bench.setup(steps, batch)
            t0 = time.perf_counter()
            try:
                full = bench.measure(Entry("full", False, "full", "full", {}))
            except Exception as exc:  # noqa: BLE001 - no baseline, nothing to compare: an error row
                log(f"{label}: full model failed: {type(exc).__name__}: {exc}")
                row = bench.new_row(Entry("full", False, "full", "full", {}))
                row["error"] = f"{type(exc).__name__}: {exc}"
                rows.append(row)
                writer()
                continue
            budget.last_row_s = time.perf_counter() - t0
            log(f"{label}: full {full['latency_ms']:.1f} ms; {len(ours)} of ours, {len(peers)} peer settings")
            failed_peers: dict[str, str] = {}
            for entry in _schedule(ours, peers):
                what = f"{label} {entry.method} {entry.settings}"
                if not budget.allows(what):
                    continue
                if entry.peer and entry.method in failed_peers and entry.variant == "sweep":
                    continue  # the recommended row already says why this peer cannot run here
                t0 = time.perf_counter()
                row = bench.measure(entry)
                budget.last_row_s = max(0.5 * budget.last_row_s, time.perf_counter() - t0)
                if entry.peer and entry.variant == "recommended" and row["error"] and _is_unsupported(row["error"]):
                    failed_peers[entry.method] = row["error"]
                _log_row(row)
            # the full model again at the end: how much the machine drifted while the rows were measured
            try:
                record_drift(full, bench.gen, args.repeats, device)
                writer()
            except Exception as exc:  # noqa: BLE001
                log(f"{label}: final full-model timing failed: {type(exc).__name__}: {exc}")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _schedule(ours: list[Entry], peers: list[Entry]) -> list[Entry]:
    """Every peer's recommended row first, then ours and the peers' sweeps alternating, so that a
    budget cut loses a little of every side instead of all of one."""
    first = [e for e in peers if e.variant == "recommended"]
    rest_peers = [e for e in peers if e.variant != "recommended"]
    out = list(first)
    for i in range(max(len(ours), len(rest_peers))):
        out += ours[i:i + 1] + rest_peers[i:i + 1]
    return out


def _is_unsupported(error: str) -> bool:
    return "cannot run here" in error or "calibration failed" in error or "not importable" in error


def _log_row(row: dict[str, Any]) -> None:
    if row.get("error"):
        log(f"  {row['method']:<20} ERROR {row['error'][:160]}")
        return
    log(f"  {row['method']:<20} {_short(row['settings']):<44} {_f(row['speedup'], '.2f')}x "
        f"psnr {_f(row['psnr_db'], '.1f') if not row['identical'] else 'ident'} "
        f"skip {_f(_pct(row['skipped_fraction']), '.0f')}% restored={row['restored']}")


def run_overhead(args: argparse.Namespace, device: torch.device, rows: list[dict[str, Any]],
                 writer: Callable[[], None], budget: Budget) -> None:
    """Per-step cost of each method when it never skips, on a real-size model (see module docstring)."""
    from diffspeed.bench.peers import PEERS
    from diffspeed.methods import BlockCacheConfig, StepCacheConfig

    on_gpu = device.type == "cuda"
    name = args.overhead_model or ("dit-xl-2" if on_gpu else "tiny-dit")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    batch = args.overhead_batch or (8 if on_gpu else 2)
    steps = args.overhead_steps or (4 if args.quick else 10)
    repeats = args.overhead_repeats or (1 if args.quick else 5)
    if not budget.allows(f"overhead stage ({name})", estimate_s=0.0):
        return
    log(f"overhead: {name} {dtype} batch {batch}, {steps} steps")
    try:
        bench = Bench(args, name, device, dtype, rows, writer)
    except Exception as exc:  # noqa: BLE001
        log(f"overhead: cannot load {name}: {type(exc).__name__}: {exc}")
        return
    bench.setup(steps, batch)
    tiny = 1e-9
    entries: list[Entry] = []
    for cfg in (StepCacheConfig(threshold=tiny), BlockCacheConfig(threshold=tiny),
                BlockCacheConfig(threshold=tiny, taylor_order=1)):
        label = cfg.method + ("_taylor1" if getattr(cfg, "taylor_order", 0) else "")
        entries.append(Entry(label, False, "diffspeed", "never_skips", _config_settings(cfg), config=cfg))
    never = {
        "fbc": {"threshold": tiny},
        "pab": {"spatial_attention_block_skip_range": 1, "spatial_attention_timestep_skip_range": [-1, 1001]},
        "fastercache": {"spatial_attention_block_skip_range": 1, "unconditional_batch_skip_range": 1,
                        "spatial_attention_timestep_skip_range": [-1, 1001],
                        "unconditional_batch_timestep_skip_range": [-1, 1001]},
        "taylorseer": {"cache_interval": 1},
        "magcache": {"threshold": tiny},
        "dbcache": {"residual_diff_threshold": tiny, "max_warmup_steps": 1},
        "dbcache_taylorseer": {"residual_diff_threshold": tiny, "max_warmup_steps": 1},
    }
    only = _names(args.peers) if args.peers else None
    for pname, settings in never.items():
        if only is not None and pname not in only:
            continue
        peer = PEERS[pname]
        entries.append(Entry(pname, True, peer.family, "never_skips", {**peer.recommended, **settings}, peer_obj=peer))
    try:
        base = bench.measure(Entry("full", False, "full", "full", {}), repeats=repeats, extra={"stage": "overhead"})
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory: nothing to compare against
        log(f"overhead: full model failed: {type(exc).__name__}: {exc}")
        row = bench.new_row(Entry("full_overhead", False, "full", "full", {}))
        row.update({"stage": "overhead", "error": f"{type(exc).__name__}: {exc}"})
        rows.append(row)
        writer()
        return
    base["method"] = "full_overhead"
    base["overhead_pct"] = 0.0
    from diffspeed.bench.timing import time_callable

    for entry in entries:
        if not budget.allows(f"overhead {entry.method}"):
            continue
        t0 = time.perf_counter()
        # the full model timed right before and right after each method, which is compared with their
        # mean: slow drift (clocks, other load) cancels out, and the before/after gap is the noise floor
        # of this comparison (an overhead smaller than it is not resolved by the measurement)
        before_ms = time_callable(bench.gen, warmup=0, repeats=repeats, device=device).median_ms
        row = bench.measure(entry, repeats=repeats, extra={"stage": "overhead"})
        after_ms = time_callable(bench.gen, warmup=1, repeats=repeats, device=device).median_ms
        full_ms = 0.5 * (before_ms + after_ms)
        budget.last_row_s = max(0.5 * budget.last_row_s, time.perf_counter() - t0)
        row["method"] = f"{entry.method}_overhead"
        row.update(full_latency_ms=full_ms, full_latency_before_ms=before_ms, full_latency_after_ms=after_ms,
                   noise_pct=100.0 * abs(after_ms - before_ms) / full_ms if full_ms else None)
        if row["latency_ms"] and full_ms:
            row["overhead_pct"] = 100.0 * (row["latency_ms"] / full_ms - 1.0)
            row["per_step_overhead_ms"] = (row["latency_ms"] - full_ms) / steps
            row["overhead_resolved"] = abs(row["overhead_pct"]) > (row["noise_pct"] or 0.0)
        if row["skipped_fraction"] not in (None, 0.0):
            row["notes"].append("it skipped work although set never to skip: overhead_pct includes savings")
        writer()
        _log_row(row)


# ---- output ------------------------------------------------------------------------------------


def _pct(value: Any) -> float | None:
    return None if value is None else 100.0 * value


_ABBREV = {
    "threshold": "thr", "residual_diff_threshold": "rdt", "Fn_compute_blocks": "Fn", "Bn_compute_blocks": "Bn",
    "max_warmup_steps": "ws", "max_continuous_cached_steps": "mcc", "taylorseer_order": "ts", "front_blocks": "F",
    "back_blocks": "B", "taylor_order": "o", "cache_interval": "N", "max_order": "ord",
    "spatial_attention_block_skip_range": "sp", "cross_attention_block_skip_range": "cr",
    "unconditional_batch_skip_range": "unc", "max_skip_steps": "K", "calibration_threshold": "cal", "calibration_reuse_fraction": "reuse",
    "calibration_max_consecutive": "mc", "calibration_guidance_threshold": "cfg",
    "calibration_correction": "corr", "calibration_correction_order": "co", "calibration_kept_correction": "kept",
    "recompute_ratio": "rr", "full_every": "fe", "idle_steps": "idle",
}


def _short(settings: Any, keys: Sequence[str] | None = None) -> str:
    if not isinstance(settings, dict):
        return str(settings)
    parts = []
    for key, value in settings.items():
        if key in _ABBREV and value is not None:
            parts.append(f"{_ABBREV[key]}={value:g}" if isinstance(value, float) else f"{_ABBREV[key]}={value}")
    return " ".join(parts)[:44]


def _psnr_value(row: dict[str, Any]) -> float | None:
    if row.get("identical"):
        return math.inf
    return row.get("psnr_db")


def _ok_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if not r.get("error") and r.get("speedup") is not None and r.get("stage") != "overhead"
            and r.get("method") != "full"]


def best_at_bar(rows: Sequence[dict[str, Any]], peer: bool, bar: float = PSNR_BAR) -> dict[str, Any] | None:
    cands = [r for r in _ok_rows(rows) if bool(r.get("peer")) == peer and (_psnr_value(r) or -1) >= bar]
    return max(cands, key=lambda r: r["speedup"]) if cands else None


def _configs(rows: Sequence[dict[str, Any]]) -> list[tuple[Any, Any, Any]]:
    seen = []
    for r in rows:
        key = (r.get("model"), r.get("steps"), r.get("batch"))
        if r.get("stage") != "overhead" and r.get("latency_ms") is not None and key not in seen:
            seen.append(key)
    return seen


def _brief(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    psnr = _psnr_value(row)
    return {"method": row["method"], "settings": row["settings"], "speedup": round(row["speedup"], 3),
            "psnr_db": None if psnr is None or math.isinf(psnr) else round(psnr, 2),
            "identical": bool(row.get("identical")),
            "skipped_fraction": None if row.get("skipped_fraction") is None else round(row["skipped_fraction"], 3)}


def summarize(rows: Sequence[dict[str, Any]], budget: Budget, elapsed: float) -> dict[str, Any]:
    per = []
    for model, steps, batch in _configs(rows):
        sub = [r for r in rows if (r.get("model"), r.get("steps"), r.get("batch")) == (model, steps, batch)]
        ours, peer = best_at_bar(sub, False), best_at_bar(sub, True)
        ratio = ours["speedup"] / peer["speedup"] if ours and peer else None
        per.append({"model": model, "steps": steps, "batch": batch, "best_ours": _brief(ours), "best_peer": _brief(peer),
                    "ratio": None if ratio is None else round(ratio, 3)})
    ratios = [p["ratio"] for p in per if p["ratio"]]
    overhead = {r["method"]: round(r["overhead_pct"], 2) for r in rows
                if r.get("stage") == "overhead" and r.get("overhead_pct") is not None and r["method"] != "full_overhead"}
    return {
        "summary": "caching", "psnr_bar_db": PSNR_BAR, "configs": per,
        "geomean_ratio": round(math.exp(sum(math.log(x) for x in ratios) / len(ratios)), 3) if ratios else None,
        "overhead_pct": overhead or None,
        "max_drift_pct": max((round(abs(r["drift_pct"]), 1) for r in rows if r.get("drift_pct") is not None),
                             default=None),
        "rows": len(rows), "errors": sum(1 for r in rows if r.get("error")),
        "not_restored": sum(1 for r in rows if r.get("restored") is False),
        "partial": budget.truncated, "skipped": len(budget.skipped), "elapsed_s": round(elapsed, 1),
    }


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    """Per configuration: the full model, then each method's fastest row at PSNR >= the bar."""
    head = f"{'method':<20} {'settings':<44} {'ms':>8} {'speedup':>7} {'psnr':>6} {'ssim':>6} {'skip%':>5} {'judge':>5}"
    for model, steps, batch in _configs(rows):
        sub = [r for r in rows if (r.get("model"), r.get("steps"), r.get("batch")) == (model, steps, batch)
               and r.get("stage") != "overhead"]
        print(f"\n== {model}  steps={steps}  batch={batch}  (fastest per method at PSNR >= {PSNR_BAR:g} dB)")
        print(head)
        full = next((r for r in sub if r["method"] == "full"), None)
        shown = [full] if full else []
        methods = list(dict.fromkeys(r["method"] for r in sub if r["method"] != "full"))
        for m in methods:
            cands = [r for r in _ok_rows(sub) if r["method"] == m and (_psnr_value(r) or -1) >= PSNR_BAR]
            if cands:
                shown.append(max(cands, key=lambda r: r["speedup"]))
        for r in shown:
            psnr = "ident" if r.get("identical") else _f(r.get("psnr_db"), ".1f")
            tag = "*" if r.get("peer") else " "
            print(f"{tag}{r['method']:<19} {_short(r.get('settings')):<44} {_f(r.get('latency_ms'), '.1f'):>8} "
                  f"{_f(r.get('speedup'), '.2f'):>7} {psnr:>6} {_f(r.get('ssim'), '.3f'):>6} "
                  f"{_f(_pct(r.get('skipped_fraction')), '.0f'):>5} {_f(r.get('judge_accuracy'), '.2f'):>5}")
        errs: dict[str, int] = {}
        for r in sub:
            if r.get("error"):
                errs[r["method"]] = errs.get(r["method"], 0) + 1
        missing = [m for m in methods if m not in {r["method"] for r in shown}]
        if missing:
            print(f"  below {PSNR_BAR:g} dB at every setting or failed: {', '.join(missing)}")
        if errs:
            print("  error rows: " + ", ".join(f"{m} x{n}" for m, n in errs.items()))
    over = [r for r in rows if r.get("stage") == "overhead"]
    if over:
        print(f"\n== overhead when never skipping ({over[0]['model']}, batch {over[0]['batch']}, "
              f"{over[0]['steps']} steps, {over[0]['dtype']})")
        for r in over:
            if r.get("error"):
                print(f"{r['method']:<32} ERROR {str(r['error'])[:90]}")
            else:
                print(f"{r['method']:<32} {_f(r.get('latency_ms'), '.1f'):>8} ms  overhead "
                      f"{_f(r.get('overhead_pct'), '+.1f'):>6}%  noise {_f(r.get('noise_pct'), '.1f'):>5}%  "
                      f"skip {_f(_pct(r.get('skipped_fraction')), '.0f')}%")
    print("  (* = peer)")


def pareto_png(rows: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Speedup vs PSNR, ours vs peers, one panel per (model, steps); frontier per group and batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((m, s) for m, s, _ in _configs(rows)))
    if not panels:
        return None
    ncol = min(2, len(panels))
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.5 * ncol, 4.6 * nrow), squeeze=False)
    markers = ["o", "s", "^", "D"]
    for ax, (model, steps) in zip(axes.flat, panels):
        sub = [r for r in _ok_rows(rows) if r.get("model") == model and r.get("steps") == steps]
        batches = sorted({r["batch"] for r in sub})
        for group, color in ((False, "tab:blue"), (True, "tab:orange")):
            for bi, batch in enumerate(batches):
                pts = []
                for r in sub:
                    if bool(r.get("peer")) != group or r["batch"] != batch:
                        continue
                    y = _psnr_value(r)
                    y = IDENTICAL_PSNR if y is not None and math.isinf(y) else y
                    if y is not None:
                        pts.append((r["speedup"], min(y, IDENTICAL_PSNR)))
                if not pts:
                    continue
                label = f"{'peers' if group else 'diffspeed'} b{batch}"
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[bi % 4], s=22, alpha=0.75,
                           label=label, edgecolors=color, facecolors=color if bi == 0 else "none")
                front = _frontier(pts)
                ax.step([p[0] for p in front], [p[1] for p in front], where="pre", color=color, alpha=0.6,
                        linestyle="-" if bi == 0 else "--", linewidth=1.2)
        ax.axhline(PSNR_BAR, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(f"{model}, {steps} steps")
        ax.set_xlabel("speedup vs full model (x)")
        ax.set_ylabel(f"PSNR vs full model (dB; identical = {IDENTICAL_PSNR:g})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated in (higher speedup, higher PSNR), sorted by speedup."""
    front = []
    best_y = -math.inf
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best_y:
            front.append((x, y))
            best_y = y
    return sorted(front)


# ---- main --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    stages = set(_names(args.stages))
    unknown = stages - {"image", "video", "overhead"}
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; choose from image, video, overhead")
    from diffspeed.bench.runner import write_json

    rows: list[dict[str, Any]] = []
    budget = Budget(args.budget_s, _T0)
    lock = threading.Lock()

    def writer() -> None:
        with lock:
            write_json(list(rows), args.out)

    finish = budget_finisher(
        budget, writer, plot=(lambda: pareto_png(rows, args.plot)) if args.plot else None,
        table=lambda: print_table(rows), summary=lambda: summarize(rows, budget, time.perf_counter() - _T0), log=log,
        json_default=_json_default)

    timer = start_watchdog(args.hard_limit_s, _T0, finish, log)
    log(f"device {device}, dtype {args.dtype}, stages {sorted(stages)}, models {args.models}, steps {args.steps}")
    try:
        if stages & {"image", "video"}:
            for name in _names(args.models):
                run_model(args, name, device, dtype, rows, writer, budget, stages)
        if "overhead" in stages:
            run_overhead(args, device, rows, writer, budget)
    finally:
        timer.cancel()
        finish(False)
        while _CALIB_DIR:
            shutil.rmtree(_CALIB_DIR.pop(), ignore_errors=True)
    if budget.skipped:
        log(f"budget: {len(budget.skipped)} row(s) skipped, e.g. {budget.skipped[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
