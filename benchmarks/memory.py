#!/usr/bin/env python
"""Peak memory with and without slicing (SlicingConfig): one transformer forward and a 2-step generation.

Models (``--models``, default ``wan-1.3b,reference-video``): real-size random-weight Wan2.1-T2V-1.3B at
as many latent frames of 480x832 as fit (``--frames`` candidates, default 21,13,9,5 latent frames =
81,49,33,17 video frames; latents (16, F, 60, 104); ``--resolutions`` adds sizes such as 720x1280),
tried in order, falling back to fewer frames
on out-of-memory (the row's ``latent_shape`` says what ran), and the trained reference video model
(1024 tokens). bf16 on CUDA, fp32 on CPU.

For each SDPA mode (``--sdpa``, default ``default,math``: ``default`` = whatever SDPA picks - flash on
an H100 for bf16, which never materialises the score matrix, so attention chunking saves little
there; ``math`` = forced math backend, which materialises heads x N x N scores, to show the
attention-chunking effect), settings ``baseline`` (no slicing) then each ``--chunks`` entry
``ff:attn`` (SlicingConfig(chunk_tokens=ff, attention_query_chunk=attn), Wan operator grouping on) or
``ff:attn:plain`` (the same with ``wan_grouping=False``: FF slicing + SDPA query chunking only), and
each mode (``forward``: one transformer forward at t=500; ``generate-2step``:
:func:`diffspeed.sampler.sample` with 2 Euler steps, no CFG): ``peak_mem_mb`` (absolute CUDA peak,
weights included; None on CPU), ``baseline_peak_mem_mb`` (the unsliced run of the same model / frames
/ sdpa / mode), ``resident_mb`` (CUDA memory allocated just before the run: weights + inputs),
``activation_peak_mb`` = ``peak_mem_mb - resident_mb`` (what the run itself adds at its peak) and
``baseline_activation_peak_mb`` the same for the unsliced run, ``activation_reduction`` =
``baseline_activation_peak_mb / activation_peak_mb`` and ``total_reduction`` =
``baseline_peak_mem_mb / peak_mem_mb`` (x-fold; None on CPU).

Read the two reductions separately: slicing can only shrink activations. The weights stay resident
(Wan-1.3B in bf16: ~2.7 GB of a ~4.3 GB unsliced peak at 32760 tokens, 63%), so even removing every
activation could not lower the total peak 2x; ``activation_reduction`` is the figure that measures
the method, ``total_reduction`` what a user sees on the device.
``max_rel_error`` = max over the batch of ||out - base|| / ||base|| vs the unsliced output,
``latency_ms`` (median of ``--repeats`` CUDA-event timed runs after one warm-up), ``sdpa_backend``
(what SDPA picks for the model's self-attention shape under that mode), ``weights_mb``.
If the unsliced run is out of memory at some frame count, the sliced settings still run at that
size (``baseline_oom: true``, ``max_rel_error`` None) and the next smaller frame count is tried.

Rows are rewritten to ``--out`` after each measurement; the last stdout line is a JSON summary.
``--budget-s`` skips work that no longer fits, ``--hard-limit-s`` writes and exits 0 (``truncated``).

Usage (H100)::

    PYTHONPATH=src python benchmarks/memory.py
    # CPU smoke:
    PYTHONPATH=src python benchmarks/memory.py --device cpu --models tiny-wan
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import gc  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402

from diffspeed.bench.runner import write_json  # noqa: E402
from diffspeed.bench.script import device_and_dtype, once, sdpa_choice, start_watchdog  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "memory.json"


def log(msg: str) -> None:
    print(f"[memory {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--models", default="wan-1.3b,reference-video")
    p.add_argument("--frames", default="21,13,9,5", help="latent frame candidates for wan-1.3b, largest first")
    p.add_argument("--resolutions", default="480x832",
                   help="comma list of HxW video pixel sizes for wan-1.3b (latent H/8 x W/8), e.g. 480x832,720x1280")
    p.add_argument("--chunks", default="8192:8192,4096:4096,1024:1024,4096:0,1024:1024:plain",
                   help="comma list of chunk_tokens:attention_query_chunk[:plain] (plain = wan_grouping off)")
    p.add_argument("--sdpa", default="default,math", help="default and/or math")
    p.add_argument("--modes", default="forward,generate-2step")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 2 CUDA, 1 CPU)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--hard-limit-s", type=float, default=500.0)
    return p.parse_args(argv)


def parse_chunk(spec: str) -> tuple[int, int, bool]:
    """``ff:attn`` or ``ff:attn:plain`` -> (chunk_tokens, attention_query_chunk, wan_grouping)."""
    parts = spec.strip().split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "plain"):
        raise SystemExit(f"--chunks entry {spec!r}: expected ff:attn or ff:attn:plain")
    return int(parts[0]), int(parts[1]), len(parts) == 2


def parse_resolution(spec: str) -> tuple[int, int]:
    """``HxW`` in video pixels -> latent (H/8, W/8); both must be multiples of 16 (VAE 8x, patch 2x)."""
    try:
        h, w = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--resolutions entry {spec!r}: expected HxW, e.g. 480x832") from None
    if h <= 0 or w <= 0 or h % 16 or w % 16:
        raise SystemExit(f"--resolutions entry {spec!r}: height and width must be positive multiples of 16")
    return h // 8, w // 8


def ratio(base: float | None, value: float | None) -> float | None:
    return round(base / value, 3) if base is not None and value else None


def sdpa_pick(heads: int, n: int, d: int, device: torch.device, dtype: torch.dtype) -> str:
    if device.type != "cuda":
        return "math (cpu)"
    q = torch.empty(1, n, heads, d, device=device, dtype=dtype).transpose(1, 2)
    return sdpa_choice(q, q, q)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from diffspeed.methods.base import apply
    from diffspeed.methods.slicing import SlicingConfig
    from diffspeed.models.loading import load_model
    from diffspeed.sampler import sample

    device, dtype = device_and_dtype(args.device, args.dtype)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    frames_cand = [int(f) for f in args.frames.split(",") if f.strip()]
    resolutions = [parse_resolution(r) for r in args.resolutions.split(",") if r.strip()]
    chunks = [parse_chunk(c) for c in args.chunks.split(",") if c.strip()]
    sdpa_modes = [s.strip() for s in args.sdpa.split(",") if s.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    repeats = args.repeats or (2 if device.type == "cuda" else 1)
    out_path = Path(args.out)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")

    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    failed: list[str] = []
    @once
    def finish(truncated: bool) -> None:
        snap = list(rows)
        write_json(snap, out_path)
        for r in snap:
            log(f"{r['model']:<16} {str(r['latent_shape']):<20} {r['sdpa']:<8} {r['mode']:<15} {r['settings']:<34} "
                f"peak {r['peak_mem_mb']} (base {r['baseline_peak_mem_mb']}) activations {r['activation_peak_mb']} "
                f"(base {r['baseline_activation_peak_mb']}, {r['activation_reduction']}x) err {r['max_rel_error']} "
                f"{r['latency_ms']} ms {r['status']}")
        savings = {}
        for r in snap:
            if r["peak_mem_mb"] is not None and r["baseline_peak_mem_mb"] and r["settings"] != "baseline":
                key = f"{r['model']}/{r['sdpa']}/{r['mode']}"
                s = 1 - r["peak_mem_mb"] / r["baseline_peak_mem_mb"]
                if key not in savings or s > savings[key]["saving"]:
                    savings[key] = {"saving": round(s, 4), "settings": r["settings"], "peak_mem_mb": r["peak_mem_mb"],
                                    "baseline_peak_mem_mb": r["baseline_peak_mem_mb"],
                                    "activation_peak_mb": r["activation_peak_mb"],
                                    "baseline_activation_peak_mb": r["baseline_activation_peak_mb"],
                                    "activation_reduction": r["activation_reduction"],
                                    "latent_shape": r["latent_shape"], "max_rel_error": r["max_rel_error"]}
        print(json.dumps({"memory": str(out_path), "rows": len(snap), "device": device_name,
                          "best_saving": savings, "skipped": skipped, "failed": failed, "truncated": truncated,
                          "elapsed_s": round(time.perf_counter() - _T0, 1)}, default=str), flush=True)

    timer = start_watchdog(args.hard_limit_s, _T0, finish, log)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def clean() -> None:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def measure(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float | None, float | None, float]:
        """(output, absolute peak MiB of the first call, MiB resident before it (weights + inputs),
        median ms of the timed calls)."""
        clean()
        resident = None
        if device.type == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device) / 2**20
        out = fn()
        sync()
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        out = out.float().cpu()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                sync()
                times.append(float(s.elapsed_time(e)))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return out, peak, resident, float(statistics.median(times))

    def is_oom(exc: BaseException) -> bool:
        return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()

    def max_rel(out: torch.Tensor, base: torch.Tensor) -> float:
        b = out.shape[0]
        o, r = out.reshape(b, -1), base.reshape(b, -1)
        return float(((o - r).norm(dim=1) / r.norm(dim=1).clamp_min(1e-30)).max())

    est_per_setting_s = 5.0
    for model_name in models:
        clean()
        try:
            loaded = load_model(model_name, device=device, dtype=dtype)
        except Exception as exc:  # noqa: BLE001
            failed.append(f"{model_name}: load: {type(exc).__name__}: {exc}")
            log(f"FAILED {failed[-1]}")
            continue
        model = loaded.transformer.requires_grad_(False)
        weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        cfg = model.config
        heads, hd = int(cfg.num_attention_heads), int(cfg.attention_head_dim)
        pt = tuple(cfg.patch_size)
        cond = loaded.make_condition([0], device)
        base_shape = tuple(loaded.latent_shape)
        frame_list = frames_cand if model_name == "wan-1.3b" else [base_shape[1]]
        sizes = resolutions if model_name == "wan-1.3b" else [tuple(base_shape[2:])]
        for sdpa, size in itertools.product(sdpa_modes, sizes):
            for frames in frame_list:
                shape = (base_shape[0], frames, *size)
                tokens = (frames // pt[0]) * (shape[2] // pt[1]) * (shape[3] // pt[2])
                ctx = (lambda: sdpa_kernel([SDPBackend.MATH])) if sdpa == "math" else (lambda: torch.no_grad())
                used = "math" if sdpa == "math" else sdpa_pick(heads, tokens, hd, device, dtype)
                g = torch.Generator().manual_seed(0)
                x = torch.randn(1, *shape, generator=g).to(device=device, dtype=dtype)
                t = torch.full((1,), 500.0, device=device)
                baseline_oom = False
                for mode in modes:
                    if mode == "forward":
                        def run() -> torch.Tensor:
                            with torch.no_grad(), ctx():
                                return loaded.adapter.predict(model, x, t, cond.cond)
                    else:
                        def run() -> torch.Tensor:
                            with torch.no_grad(), ctx():
                                return sample(model, cond, seeds=[0], latent_shape=shape, num_steps=2,
                                              guidance_scale=1.0, adapter=loaded.adapter, check_finite=False)
                    base_out, base_peak, base_act = None, None, None
                    for ff, ac, grouping in [(None, None, None), *chunks]:
                        label = ("baseline" if ff is None else
                                 f"slicing ff={ff} attn={ac}" + ("" if grouping else " plain"))
                        elapsed = time.perf_counter() - _T0
                        mult = 2.0 if mode != "forward" else 1.0
                        if elapsed + est_per_setting_s * mult * (1 + repeats) > args.budget_s:
                            skipped.append(f"{model_name} {shape} {sdpa} {mode} {label}")
                            continue
                        handle = None
                        s0 = time.perf_counter()
                        row = {"model": model_name, "latent_shape": list(shape), "tokens": tokens, "sdpa": sdpa,
                               "sdpa_backend": used, "mode": mode, "settings": label,
                               "chunk_tokens": ff, "attention_query_chunk": ac, "wan_grouping": grouping,
                               "dtype": str(dtype).replace("torch.", ""),
                               "weights_mb": round(weights_mb, 1), "device": device_name, "command": command,
                               "peak_mem_mb": None, "baseline_peak_mem_mb": base_peak, "resident_mb": None,
                               "activation_peak_mb": None, "baseline_activation_peak_mb": base_act,
                               "activation_reduction": None, "total_reduction": None, "max_rel_error": None,
                               "latency_ms": None, "baseline_oom": baseline_oom, "status": "ok"}
                        try:
                            if ff is not None:
                                handle = apply(model, SlicingConfig(chunk_tokens=ff, attention_query_chunk=ac,
                                                                    wan_grouping=grouping), loaded.adapter)
                            out, peak, resident, ms = measure(run)
                            act = None if peak is None or resident is None else round(peak - resident, 1)
                            row.update(peak_mem_mb=None if peak is None else round(peak, 1), latency_ms=round(ms, 3),
                                       resident_mb=None if resident is None else round(resident, 1),
                                       activation_peak_mb=act)
                            if ff is None:
                                base_out, base_peak, base_act = out, row["peak_mem_mb"], act
                                row["baseline_peak_mem_mb"] = base_peak
                                row["baseline_activation_peak_mb"] = base_act
                                row["max_rel_error"] = 0.0
                            elif base_out is not None:
                                row["max_rel_error"] = max_rel(out, base_out)
                            row["activation_reduction"] = ratio(row["baseline_activation_peak_mb"], act)
                            row["total_reduction"] = ratio(row["baseline_peak_mem_mb"], row["peak_mem_mb"])
                            if handle is not None:
                                row["notes"] = list(getattr(handle, "notes", []))
                                row["stats"] = {k: v for k, v in handle.stats.items() if isinstance(v, (int, float))}
                            del out
                        except Exception as exc:  # noqa: BLE001
                            if is_oom(exc):
                                row["status"] = "oom"
                                if ff is None:
                                    baseline_oom = True
                                    row["baseline_oom"] = True
                            else:
                                row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                                failed.append(f"{model_name} {shape} {sdpa} {mode} {label}: {row['status']}")
                                traceback.print_exc(file=sys.stderr)
                        finally:
                            if handle is not None:
                                handle.remove()
                            clean()
                        est_per_setting_s = max(est_per_setting_s * 0.5,
                                                (time.perf_counter() - s0) / mult / (1 + repeats))
                        rows.append(row)
                        log(f"{model_name} {shape} {sdpa}({used}) {mode} {label}: peak {row['peak_mem_mb']} MiB, "
                            f"activations {row['activation_peak_mb']} MiB ({row['activation_reduction']}x), "
                            f"err {row['max_rel_error']}, {row['latency_ms']} ms, {row['status']}")
                        write_json(rows, out_path)
                    del base_out
                del x
                clean()
                if not baseline_oom:
                    break  # the largest frame count where the unsliced run fits is done
        del model, loaded, cond
        clean()
    timer.cancel()
    finish(False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
