#!/usr/bin/env python
"""The honest dense speed every method is measured against: one DiT transformer forward.

Real-size DiT-XL/2 with random weights (256 px => latents (4, 32, 32), 256 tokens, 28 blocks, 16 heads
of 72 channels), transformer forward only (timestep + class labels), bf16, no guidance batching:
``batch`` is the forward's batch. For each batch it measures eager and ``torch.compile`` (mode
default; at batch 1 also ``reduce-overhead`` = CUDA graphs) and, as extra rows with a ``variant``
field, the promising variants: QKV projections fused into one GEMM (``fused_qkv``) and
``max-autotune`` compilation (Triton GEMM templates with fused epilogues). Every row is measured
on this run; nothing is extrapolated.

Method:

* ``matmul_peak_tflops``: median of timed 8192^3 bf16 ``torch.mm`` calls (CUDA events) - the
  achievable dense peak of *this* device; ``mfu`` = achieved / that peak (not the datasheet peak).
* SDPA: for each batch the attention shape (B, 16, 256, 72) is timed with every SDPA backend alone
  (flash, memory-efficient, cuDNN, math); the model then runs with the fastest one
  (``sdpa_backend``); ``sdpa_default_backend`` is what SDPA picks by itself for that shape.
* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` on one eager forward (attention counted
  through the math path so every backend gets the same count); ``tflops_per_step`` = that / 1e12.
* timing (``do_bench``-like): warm-up calls (the first compiled call compiles: ``compile_s``),
  then back-to-back forwards, each bracketed by CUDA events; ``ms_per_step`` is the median;
  ``ms_per_step_wall`` the wall-clock mean of the same loop (a cross-check).
* ``rel_err_vs_eager``: ||out - ref|| / ||ref||, ref = the eager plain forward with math-path attention
  on the same inputs (so a wrong fast kernel shows); ``graphs`` / ``graph_breaks`` /
  ``cudagraph_skips``: dynamo and inductor counters during that configuration's calls.
* Configurations run in priority order (see :func:`build_plan`) under ``--budget-s`` (default
  400 s from process start): a compiled configuration whose estimated cost (from the compile
  times measured so far) no longer fits is skipped and listed in the summary's ``skipped``.
  ``--hard-limit-s`` (default 465 s) is a watchdog: it writes what was measured, prints the table
  and the summary with ``truncated: true`` and exits 0, even mid-compile. Results are also
  rewritten after every row, so a killed run keeps what it measured.

Usage (H100)::

    PYTHONPATH=/tmp/site:src python benchmarks/dense_baseline.py
    # CPU smoke path (tests):
    PYTHONPATH=src python benchmarks/dense_baseline.py --device cpu --model tiny-dit --batches 1,2

Prints a table and, last, one JSON line with a summary.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # the 8-minute budget counts from process start, imports included

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from diffspeed.bench.runner import to_jsonable, write_json  # noqa: E402
from diffspeed.bench.script import device_and_dtype, once, sdpa_backends, sdpa_choice, start_watchdog  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "dense_baseline.json"
COMPILED_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
VARIANTS = ("plain", "fused_qkv")

# fallback configs when diffspeed.models.zoo cannot be imported (same shapes as the zoo's)
_FALLBACK_CONFIGS: dict[str, dict[str, Any]] = {
    "dit-xl-2": dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                     sample_size=32, patch_size=2, num_embeds_ada_norm=1000),
    "tiny-dit": dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                     sample_size=8, patch_size=2, num_embeds_ada_norm=10),
}


def log(msg: str) -> None:
    print(f"[dense_baseline {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- setup -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--model", default="dit-xl-2", help="zoo model name (DiT family): dit-xl-2, tiny-dit")
    p.add_argument("--batches", default="1,8,32", help="comma-separated forward batch sizes")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--modes", default=None,
                   help="comma list of eager," + ",".join(COMPILED_MODES) + " (default: all on CUDA, eager on CPU)")
    p.add_argument("--variants", default="plain,fused_qkv", help="comma list of " + ",".join(VARIANTS))
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON list of rows (rewritten after each configuration)")
    p.add_argument("--budget-s", type=float, default=400.0,
                   help="skip compiled configurations whose estimated cost no longer fits in this many seconds "
                        "(counted from process start)")
    p.add_argument("--hard-limit-s", type=float, default=465.0,
                   help="at this many seconds from process start, write what was measured, print the summary "
                        "(truncated: true) and exit 0, even in the middle of a compile")
    p.add_argument("--target-ms", type=float, default=None,
                   help="timed time per configuration (default 1000 ms on CUDA, 200 ms on CPU)")
    p.add_argument("--min-reps", type=int, default=None, help="minimum timed forwards (default 20 CUDA, 3 CPU)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_transformer(name: str, device: torch.device, dtype: torch.dtype, seed: int) -> tuple[torch.nn.Module, str]:
    """The transformer from diffspeed's zoo; a local diffusers build with the same shapes if the zoo
    cannot be imported."""
    try:
        from diffspeed.models.zoo import build_model  # type: ignore[import-not-found]
    except Exception as exc:  # noqa: BLE001 - the zoo is optional for this script
        build_model = None
        log(f"diffspeed.models.zoo unavailable ({type(exc).__name__}: {exc}); building {name!r} locally")
    if build_model is not None:
        obj = build_model(name, seed=seed, dtype=dtype, device=device)
        model = getattr(obj, "transformer", obj)
        source = "diffspeed.models.zoo"
    else:
        if name not in _FALLBACK_CONFIGS:
            raise SystemExit(f"unknown model {name!r} (zoo unavailable; local fallbacks: {', '.join(_FALLBACK_CONFIGS)})")
        from diffusers import DiTTransformer2DModel

        torch.manual_seed(seed)
        model = DiTTransformer2DModel(**_FALLBACK_CONFIGS[name])
        source = "local diffusers DiTTransformer2DModel (zoo unavailable)"
    p0 = next(model.parameters())
    if p0.device != device or p0.dtype != dtype:  # the zoo builds on the device, in the dtype
        model = model.to(device=device, dtype=dtype)
    model = model.eval().requires_grad_(False)
    cfg = getattr(model, "config", None)
    for key in ("in_channels", "sample_size", "patch_size", "num_attention_heads", "attention_head_dim", "num_embeds_ada_norm"):
        if cfg is None or getattr(cfg, key, None) is None:
            raise SystemExit(f"dense_baseline needs a class-conditional DiT (config.{key} missing on {type(model).__name__})")
    return model, source


def make_inputs(model: torch.nn.Module, batch: int, device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    cfg = model.config
    g = torch.Generator().manual_seed(seed + batch)
    size = int(cfg.sample_size)
    x = torch.randn(batch, int(cfg.in_channels), size, size, generator=g).to(device=device, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device=device, dtype=torch.float32)
    y = torch.randint(0, int(cfg.num_embeds_ada_norm), (batch,), generator=g).to(device)
    return {"hidden_states": x, "timestep": t, "class_labels": y, "return_dict": False}


def attention_shape(model: torch.nn.Module, batch: int) -> tuple[int, int, int, int]:
    cfg = model.config
    tokens = (int(cfg.sample_size) // int(cfg.patch_size)) ** 2
    return batch, int(cfg.num_attention_heads), tokens, int(cfg.attention_head_dim)


# ---- timing --------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], Any], device: torch.device, *, warmup: int, target_ms: float, min_reps: int,
          max_reps: int = 2000) -> dict[str, Any]:
    """do_bench-like: warm-up, size the loop to ~target_ms, time every call; median in ms."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    est_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    reps = int(min(max_reps, max(min_reps, target_ms / est_ms)))
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        sync(device)
        w0 = time.perf_counter()
        for i in range(reps):
            starts[i].record()
            fn()
            ends[i].record()
        sync(device)
        wall = (time.perf_counter() - w0) * 1e3
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        times = []
        w0 = time.perf_counter()
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        wall = (time.perf_counter() - w0) * 1e3
    return {"median_ms": float(statistics.median(times)), "wall_mean_ms": wall / reps, "reps": reps,
            "min_ms": float(min(times))}


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    n = 8192 if device.type == "cuda" else 1024
    mm_dtype = torch.bfloat16 if device.type == "cuda" else dtype
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device, dtype=mm_dtype)
    b = torch.randn(n, n, generator=g, device=device, dtype=mm_dtype)
    c = torch.empty(n, n, device=device, dtype=mm_dtype)
    res = bench(lambda: torch.mm(a, b, out=c), device, warmup=10 if device.type == "cuda" else 2,
                target_ms=1000 if device.type == "cuda" else 100, min_reps=30 if device.type == "cuda" else 3,
                max_reps=200)
    del a, b, c
    return {"matmul_peak_tflops": 2 * n**3 / (res["median_ms"] * 1e-3) / 1e12, "n": n,
            "dtype": str(mm_dtype).replace("torch.", ""), "median_ms": res["median_ms"], "reps": res["reps"]}


# ---- SDPA ----------------------------------------------------------------------------------------


def probe_sdpa(model: torch.nn.Module, batch: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Time every SDPA backend alone on this batch's attention shape (layout as in diffusers'
    processor: (B, S, H, D) transposed to (B, H, S, D))."""
    from torch.nn.attention import sdpa_kernel

    b, h, s, d = attention_shape(model, batch)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, s, h, d, generator=g).to(device=device, dtype=dtype).transpose(1, 2) for _ in range(3))
    out: dict[str, Any] = {"shape": [b, h, s, d], "default": sdpa_choice(q, k, v), "ms": {}, "errors": {}}
    for name, backend in sdpa_backends():
        try:
            with sdpa_kernel([backend]), torch.no_grad():
                F.scaled_dot_product_attention(q, k, v)
                res = bench(lambda: F.scaled_dot_product_attention(q, k, v), device, warmup=3,
                            target_ms=100 if device.type == "cuda" else 20, min_reps=10 if device.type == "cuda" else 2,
                            max_reps=500)
            out["ms"][name] = res["median_ms"]
        except Exception as exc:  # noqa: BLE001 - a backend that cannot run this shape
            out["errors"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    fast = {n: ms for n, ms in out["ms"].items() if n != "math"} or out["ms"]
    out["fastest"] = min(fast, key=fast.get) if fast else None
    return out


def backend_by_name(name: str | None) -> Any:
    return dict(sdpa_backends()).get(name)


# ---- model variants ------------------------------------------------------------------------------


def set_variant(model: torch.nn.Module, variant: str) -> int:
    """``fused_qkv``: one (3*dim x dim) GEMM for q, k, v in every self-attention (diffusers'
    ``Attention.fuse_projections`` + ``FusedAttnProcessor2_0``); ``plain``: the original processors.
    Returns how many attention modules were switched."""
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    n = 0
    for mod in model.modules():
        if not isinstance(mod, Attention) or getattr(mod, "is_cross_attention", False):
            continue
        if variant == "fused_qkv":
            if "_dense_orig_processor" not in mod.__dict__:
                mod.__dict__["_dense_orig_processor"] = mod.processor
            if getattr(mod, "to_qkv", None) is None:
                mod.fuse_projections()
            mod.set_processor(FusedAttnProcessor2_0())
            mod.fused_projections = True
        elif variant == "plain":
            orig = mod.__dict__.get("_dense_orig_processor")
            if orig is not None:
                mod.set_processor(orig)
            mod.fused_projections = False
        else:
            raise SystemExit(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
        n += 1
    return n


def count_flops(model: torch.nn.Module, inputs: dict[str, Any]) -> float:
    """FlopCounterMode on one eager forward, attention through the math path (counted as its two
    batched matmuls, the same FLOPs any fused kernel does)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
        model(**inputs)
    return float(counter.get_total_flops())


def reference_output(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        return model(**inputs)[0].clone()


def dynamo_counts() -> dict[str, int | None]:
    """Cumulative dynamo/inductor counters: graphs compiled, graph breaks, CUDA-graph skips."""
    try:
        from torch._dynamo.utils import counters

        return {"graphs": int(counters["stats"]["unique_graphs"]),
                "graph_breaks": int(sum(counters["graph_break"].values())),
                "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"])}
    except Exception:  # noqa: BLE001 - informative only
        return {"graphs": None, "graph_breaks": None, "cudagraph_skips": None}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float | None:
    a, b = out.detach().double(), ref.detach().double()
    den = float(b.norm())
    val = float((a - b).norm()) / den if den > 0 else float("nan")
    return val if math.isfinite(val) else None


# ---- output --------------------------------------------------------------------------------------


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = [("variant", "variant", "{}"), ("batch", "batch", "{}"), ("compiled", "compiled", "{}"),
            ("sdpa", "sdpa_backend", "{}"), ("ms/step", "ms_per_step", "{:.3f}"), ("wall ms", "ms_per_step_wall", "{:.3f}"),
            ("TFLOP/step", "tflops_per_step", "{:.4f}"), ("TFLOP/s", "achieved_tflops", "{:.1f}"), ("MFU", "mfu", "{:.1%}"),
            ("compile s", "compile_s", "{:.1f}"), ("rel err", "rel_err_vs_eager", "{:.2e}")]
    cells = [[h for h, _, _ in cols]]
    for r in sorted(rows, key=lambda r: r["batch"]):  # stable: run order within a batch
        line = []
        for _, key, fmt in cols:
            val = r.get(key)
            line.append("-" if val is None else (fmt.format(val) if not isinstance(val, bool) else str(val)))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    print()
    if rows:
        r0 = rows[0]
        print(f"dense baseline: {r0['model']} | {r0['dtype']} | {r0['device']} | torch {r0['torch_version']} | "
              f"matmul peak {r0['matmul_peak_tflops']:.1f} TFLOP/s")
    for i, line in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()


# ---- main ----------------------------------------------------------------------------------------


def build_plan(batches: list[int], modes: list[str], variants: list[str]) -> list[tuple[str, str, list[int]]]:
    """(variant, mode, batches) groups in priority order, so that a run cut short by the budget still
    has what matters: the plain eager rows, plain compiled rows at the smallest and largest batch,
    CUDA graphs at the smallest batch, then the variants most likely to reach the targets (batch-1
    latency: CUDA graphs; large-batch MFU: fused QKV + max-autotune GEMMs with fused epilogues),
    then the middle batches and the rest if time permits."""
    small, large = min(batches), max(batches)
    ends = sorted({small, large})
    middle = [b for b in batches if b not in ends]
    plan: list[tuple[str, str, list[int]]] = [
        ("plain", "eager", batches),
        ("plain", "default", ends),
        ("plain", "reduce-overhead", [small]),
        ("fused_qkv", "eager", batches),
        ("fused_qkv", "max-autotune-no-cudagraphs", [large]),
        ("fused_qkv", "reduce-overhead", [small]),
        ("plain", "default", middle),
        ("fused_qkv", "default", [large]),
        ("plain", "max-autotune-no-cudagraphs", ends),
        ("fused_qkv", "max-autotune", [small]),
    ]
    return [(v, m, bs) for v, m, bs in plan if bs and v in variants and m in modes]


def estimate_s(mode: str, n_batches: int, compile_s: float) -> float:
    if mode == "eager":
        return 5.0 * n_batches
    per_first = compile_s * (2.5 if "max-autotune" in mode else 1.0) + (30.0 if "max-autotune" in mode else 0.0)
    return per_first * (1 + 0.7 * (n_batches - 1)) + 5.0 * n_batches


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, dtype = device_and_dtype(args.device, args.dtype)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    modes = [m.strip() for m in (args.modes or ("eager," + ",".join(COMPILED_MODES) if device.type == "cuda" else "eager")).split(",") if m.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for m in modes:
        if m != "eager" and m not in COMPILED_MODES:
            raise SystemExit(f"unknown mode {m!r}; known: eager, {', '.join(COMPILED_MODES)}")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    target_ms = args.target_ms or (1000.0 if device.type == "cuda" else 200.0)
    min_reps = args.min_reps or (20 if device.type == "cuda" else 3)
    out_path = Path(args.out)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    import torch._dynamo as _dynamo  # noqa: F401  (an "import torch.x" here would make torch local)
    import torch._inductor.config as inductor_config

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, int(getattr(torch._dynamo.config, name))))
    if device.type == "cuda" and hasattr(inductor_config, "max_autotune_gemm_backends"):
        inductor_config.max_autotune_gemm_backends = "ATEN,TRITON"  # cap autotuning: no CUTLASS/CK/CPP

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except Exception:  # noqa: BLE001
        diffusers_version = None
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine() or "cpu")

    log(f"device {device_name}, torch {torch.__version__}, diffusers {diffusers_version}, dtype {dtype}")
    model, source = build_transformer(args.model, device, dtype, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model {args.model} ({type(model).__name__}, {n_params / 1e6:.1f} M params) from {source}")

    peak = matmul_peak_tflops(device, dtype)
    log(f"matmul peak: {peak['matmul_peak_tflops']:.1f} TFLOP/s ({peak['n']}^3 {peak['dtype']}, median of {peak['reps']})")

    probes = {b: probe_sdpa(model, b, device, dtype) for b in batches}
    for b, pr in probes.items():
        times = ", ".join(f"{k} {v:.4f} ms" for k, v in pr["ms"].items())
        log(f"SDPA b{b} {pr['shape']}: default pick {pr['default']}; {times}; fastest {pr['fastest']}"
            + (f"; unavailable: {pr['errors']}" if pr["errors"] else ""))

    inputs = {b: make_inputs(model, b, device, dtype, args.seed) for b in batches}
    set_variant(model, "plain")
    flops = {b: count_flops(model, inputs[b]) for b in batches}
    # numerics reference: eager, plain, attention through the math path (independent of the fast kernels)
    refs = {b: reference_output(model, inputs[b]) for b in batches}

    from torch.nn.attention import sdpa_kernel

    def attn_ctx(b: int, fallback: bool) -> Any:
        backend = backend_by_name(probes[b]["fastest"]) if not fallback else None
        return sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()

    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    failed: list[str] = []
    compile_est = 90.0 if device.type == "cuda" else 30.0  # until a compile has been measured
    compile_seen: list[float] = []
    base = {
        "model": args.model,
        "model_source": source,
        "params_m": round(n_params / 1e6, 2),
        "latent_shape": list(inputs[batches[0]]["hidden_states"].shape[1:]),
        "dtype": str(dtype).replace("torch.", ""),
        "matmul_peak_tflops": peak["matmul_peak_tflops"],
        "device": device_name,
        "torch_version": torch.__version__,
        "diffusers_version": diffusers_version,
        "command": command,
    }

    @once
    def finish(truncated: bool) -> None:
        """Write the rows, print the table and the summary line (main thread or watchdog)."""
        rows_now = list(rows)
        write_json(rows_now, out_path)
        print_table(rows_now)
        print(json.dumps(to_jsonable(summarize(rows_now, truncated))), flush=True)

    def summarize(rows_now: list[dict[str, Any]], truncated: bool) -> dict[str, Any]:
        def best(pred: Callable[[dict[str, Any]], bool], key: str, fn: Callable = min) -> dict[str, Any] | None:
            cand = [r for r in rows_now if pred(r)]
            return fn(cand, key=lambda r: r[key]) if cand else None

        b_small, b_large = min(batches), max(batches)
        best_small = best(lambda r: r["batch"] == b_small, "ms_per_step")
        best_large = best(lambda r: r["batch"] == b_large, "mfu", max)
        return {
            "dense_baseline": str(out_path),
            "rows": len(rows_now),
            "device": device_name,
            "matmul_peak_tflops": peak["matmul_peak_tflops"],
            "sdpa": {str(b): {"default": p["default"], "fastest": p["fastest"], "ms": p["ms"]} for b, p in probes.items()},
            f"best_b{b_small}": None if best_small is None else {
                "ms_per_step": best_small["ms_per_step"], "variant": best_small["variant"],
                "compiled": best_small["compiled"]},
            f"best_b{b_large}": None if best_large is None else {
                "mfu": best_large["mfu"], "ms_per_step": best_large["ms_per_step"], "variant": best_large["variant"],
                "compiled": best_large["compiled"]},
            # the targets, for DiT-XL/2 on a GPU only
            "targets": None if args.model != "dit-xl-2" or device.type != "cuda" else {
                "b1_le_3ms": None if best_small is None or b_small != 1 else best_small["ms_per_step"] <= 3.0,
                "b32_mfu_ge_60pct": None if best_large is None or b_large != 32 else best_large["mfu"] >= 0.60,
            },
            "skipped": list(skipped),
            "failed": list(failed),
            "truncated": truncated,
            "elapsed_s": round(time.perf_counter() - _T0, 1),
        }

    timer = start_watchdog(args.hard_limit_s, _T0, finish, log)

    for variant, mode, group_batches in build_plan(batches, modes, variants):
        label = f"{variant}/{mode}/b{','.join(map(str, group_batches))}"
        elapsed = time.perf_counter() - _T0
        est = estimate_s(mode, len(group_batches), compile_est)
        if mode != "eager" and elapsed + est > args.budget_s:
            skipped.append(f"{label} (estimated {est:.0f} s, {args.budget_s - elapsed:.0f} s of budget left)")
            log(f"skip {skipped[-1]}")
            continue
        log(f"run {label} (elapsed {elapsed:.0f} s)")
        set_variant(model, variant)
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        runner: Any = model
        if mode != "eager":
            runner = torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)
        mark_step = mode in CUDAGRAPH_MODES and device.type == "cuda"
        for b in group_batches:
            inp = inputs[b]
            holder: dict[str, Any] = {}

            def call(inp: dict[str, Any] = inp) -> Any:
                if mark_step:
                    torch.compiler.cudagraph_mark_step_begin()
                return runner(**inp)[0]

            row = None
            for fallback in (False, True):
                if fallback and probes[b]["fastest"] == probes[b]["default"]:
                    break
                if fallback and mode != "eager" and time.perf_counter() - _T0 + compile_est > args.budget_s:
                    skipped.append(f"{label} b{b} retry with SDPA's default pick (no budget left)")
                    break
                before = dynamo_counts()
                try:
                    with torch.no_grad(), attn_ctx(b, fallback):
                        t0 = time.perf_counter()
                        first = call()
                        sync(device)
                        first_s = time.perf_counter() - t0
                        out = call().clone()
                        sync(device)
                        holder["out"] = out
                        del first
                        res = bench(call, device, warmup=5 if mode != "eager" else 2, target_ms=target_ms, min_reps=min_reps)
                        # what SDPA picks under this context for this batch's attention layout
                        bb, hh, ss, dd = attention_shape(model, b)
                        qq = torch.empty(bb, ss, hh, dd, device=device, dtype=dtype).transpose(1, 2)
                        used = sdpa_choice(qq, qq, qq)
                    after = dynamo_counts()
                    row = {"fallback": fallback, "first_s": first_s, "res": res, "sdpa_backend": used,
                           **{k: (after[k] - before[k]) if mode != "eager" and after[k] is not None
                              and before[k] is not None else None for k in after}}
                    break
                except Exception as exc:  # noqa: BLE001 - record and go on with the next configuration
                    msg = f"{label} b{b}{' (default SDPA)' if fallback else ''}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                    failed.append(msg)
                    log(f"FAILED {msg}")
                    traceback.print_exc(file=sys.stderr)
                    torch._dynamo.reset()
                    if mode != "eager":
                        runner = torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)
            if row is None:
                continue
            res = row["res"]
            if mode in ("default", "reduce-overhead") and b == group_batches[0]:
                compile_seen.append(row["first_s"])
                compile_est = max(compile_seen)  # later estimates use the slowest plain compile seen
            ms = res["median_ms"]
            tflops = flops[b] / 1e12
            achieved = tflops / (ms * 1e-3)
            r = {
                **base,
                "variant": variant,
                "batch": b,
                "compiled": False if mode == "eager" else mode,
                "ms_per_step": ms,
                "ms_per_step_wall": res["wall_mean_ms"],
                "ms_per_step_min": res["min_ms"],
                "reps": res["reps"],
                "tflops_per_step": tflops,
                "achieved_tflops": achieved,
                "mfu": achieved / peak["matmul_peak_tflops"],
                "sdpa_backend": row["sdpa_backend"],
                "sdpa_default_backend": probes[b]["default"],
                "compile_s": row["first_s"] if mode != "eager" else None,
                "rel_err_vs_eager": rel_err(holder["out"], refs[b]),
                "graphs": row["graphs"],
                "graph_breaks": row["graph_breaks"],
                "cudagraph_skips": row["cudagraph_skips"],
                "notes": [],
            }
            if r["rel_err_vs_eager"] is None or r["rel_err_vs_eager"] > 0.1:
                r["notes"].append("output far from the eager math-attention reference: check numerics")
            if row["fallback"]:
                r["notes"].append(f"fastest SDPA backend {probes[b]['fastest']} failed here; ran with SDPA's default pick")
            if res["median_ms"] < 0.8 * res["wall_mean_ms"]:
                r["notes"].append("event median well below wall-clock mean: CPU-bound launches or stream mismatch")
            rows.append(r)
            log(f"  b{b}: {ms:.3f} ms/step (wall {res['wall_mean_ms']:.3f}), {achieved:.1f} TFLOP/s, MFU {r['mfu']:.1%}"
                + (f", first call {row['first_s']:.1f} s" if mode != "eager" else ""))
            write_json(rows, out_path)
        del runner
        if mode != "eager":
            torch._dynamo.reset()

    set_variant(model, "plain")
    timer.cancel()
    finish(False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
