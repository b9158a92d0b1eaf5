#!/usr/bin/env python
"""Quantization benchmark: diffspeed's ``ptq_`` formats vs plain torchao (as diffusers' TorchAoConfig
applies it: every linear layer, no calibration, no compensation - ``quantize_`` with
``skip_sensitive=False`` quantizes exactly the layers ``from_pretrained(..., quantization_config=
TorchAoConfig(...))`` does, checked in ``tests/test_quantize.py``), on speed, memory and fidelity.

Three stages (``--stages``), all written as rows of one JSON list (``--out``):

* ``fidelity`` - reference-image (the shipped trained DiT) in bf16 on the GPU (fp32 on CPU):
  ``--samples`` class-balanced samples, ``--steps`` flow-matching Euler steps, CFG ``--guidance``;
  every config's final images vs the unquantized model's (same seeds): PSNR, SSIM, judge accuracy.
  Static activation scales and SmoothQuant use activation statistics from ``--calib-seeds`` other
  seeds (timestep-grouped, :mod:`diffspeed.quant.calibration`). ``+comp`` rows add cumulative error
  compensation (:mod:`diffspeed.quant.compensation`, calibrated on the calibration seeds) to the
  lowest-bit config; ``mixed`` rows use a per-layer bit assignment under a weight-size budget
  (:mod:`diffspeed.quant.mixed_precision`). The transformer step latency at the sampling batch
  (eager) and the compensation overhead are measured too.
* ``speed`` - real-size random-weight configs, compiled per block (regional ``torch.compile``, one
  compile shared by all blocks): DiT-XL/2 (256 px, 256 tokens, hidden 1152) at ``--dit-batches``
  and a FLUX-width config (hidden 3072, 4096 image + 512 text tokens, ``--flux-blocks`` double +
  single blocks) at ``--flux-batch``. Latency of one transformer call (median of CUDA-event timed
  calls), peak memory, weight MB.

* ``size`` - the ``--speed-models`` configs' transformer weight bytes per format (real size, random weights, bf16), with
  the default layer selection and with every linear quantized (``skip_sensitive=False``). Storage
  only: the same on any device.

``low_precision_kernel`` is true only if a profiler trace of one call shows a low-bit GEMM op or
kernel (``_int_mm``, ``_scaled_mm``, int4/int8 pack mm, or an int8/fp8 GEMM kernel name): a config
whose low-bit weights are cast up to bf16 before a bf16 GEMM is reported as such (false).
``speedup`` is vs bf16 with the same compile setting and batch.

    python benchmarks/quantization.py --out benchmarks/results/quantization.json --plot benchmarks/results/quantization.png
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402

from diffspeed.bench.runner import write_json  # noqa: E402
from diffspeed.bench.script import once, start_watchdog  # noqa: E402

LOWP = re.compile(r"_int_mm|_scaled_mm|int4pack|int8pack|e4m3|fp8|f8f8|s8s8|i8i8|int8_gemm|igemm", re.I)
FIDELITY_CONFIGS = (
    # (name, peer, kind, settings)
    ("torchao int8_weight_only", True, "torchao", {"backend": "int8_weight_only", "skip_sensitive": False}),
    ("torchao int8_dynamic", True, "torchao", {"backend": "int8_dynamic", "skip_sensitive": False}),
    ("torchao fp8_dynamic_row", True, "torchao", {"backend": "fp8_dynamic_row", "skip_sensitive": False}),
    ("ptq int8_w8a8 dynamic", False, "ptq", {"format": "int8_w8a8", "act": "dynamic"}),
    ("ptq int8_w8a8 dynamic+smooth", False, "ptq", {"format": "int8_w8a8", "act": "dynamic", "smooth_alpha": 0.5}),
    ("ptq int8_w8a8 static", False, "ptq", {"format": "int8_w8a8", "act": "static"}),
    ("ptq int8_w8a8 static+smooth", False, "ptq", {"format": "int8_w8a8", "act": "static", "smooth_alpha": 0.5}),
    # the alpha `--smooth-alpha auto` picks on this model (benchmarks/results/smooth_alpha_cpu.json)
    ("ptq int8_w8a8 static+smooth 0.65", False, "ptq", {"format": "int8_w8a8", "act": "static", "smooth_alpha": 0.65}),
    ("ptq fp8_w8a8 dynamic", False, "ptq", {"format": "fp8_w8a8", "act": "dynamic"}),
    ("ptq fp8_w8a8 static", False, "ptq", {"format": "fp8_w8a8", "act": "static"}),
    ("ptq int8_weight_only", False, "ptq", {"format": "int8_weight_only"}),
    ("ptq int4_weight_only g32", False, "ptq", {"format": "int4_weight_only", "group_size": 32}),
    ("ptq int4_weight_only g64", False, "ptq", {"format": "int4_weight_only", "group_size": 64}),
    # every linear, adaLN modulation and final layer included: what the whole transformer's int4 size needs
    ("ptq int4_weight_only g32 all linears", False, "ptq", {"format": "int4_weight_only", "group_size": 32,
                                                            "skip_sensitive": False}),
    ("ptq int4_weight_only g32 all linears + int8 embeddings", False, "ptq",
     {"format": "int4_weight_only", "group_size": 32, "skip_sensitive": False, "quantize_embeddings": True}),
    # the coarsest group torch's int4 kernel takes at width 1152: where plain PTQ loses most (compensation target)
    ("ptq int4_weight_only g128", False, "ptq", {"format": "int4_weight_only", "group_size": 128}),
    # GPTQ error-compensating rounding, second moments over the calibration seeds' whole trajectories
    ("ptq int4_weight_only g32 +gptq", False, "ptq_gptq", {"format": "int4_weight_only", "group_size": 32}),
    ("ptq int4_weight_only g64 +gptq", False, "ptq_gptq", {"format": "int4_weight_only", "group_size": 64}),
    ("ptq int8_w8a8 dynamic +gptq", False, "ptq_gptq", {"format": "int8_w8a8", "act": "dynamic"}),
    ("ptq int4_weight_only g32 all linears +gptq", False, "ptq_gptq",
     {"format": "int4_weight_only", "group_size": 32, "skip_sensitive": False}),
)
SIZE_CONFIGS = (  # (name, settings): storage only, so any device measures it
    ("bf16", None),
    ("ptq int8 (w8a8 / weight-only; fp8 stores the same bytes)", {"format": "int8_weight_only"}),
    ("ptq int4_weight_only g128", {"format": "int4_weight_only", "group_size": 128}),
    ("ptq int4_weight_only g128 all linears", {"format": "int4_weight_only", "group_size": 128, "skip_sensitive": False}),
    ("ptq int4_weight_only g128 all linears + int8 embeddings", {"format": "int4_weight_only", "group_size": 128,
                                                                "skip_sensitive": False, "quantize_embeddings": True}),
    ("ptq int4_weight_only g32 all linears", {"format": "int4_weight_only", "group_size": 32, "skip_sensitive": False}),
)
SPEED_CONFIGS = (  # in priority order (a budget cut drops the last ones)
    ("bf16", False, "none", {}),
    ("ptq fp8_w8a8 dynamic", False, "ptq", {"format": "fp8_w8a8", "act": "dynamic"}),
    ("torchao fp8_dynamic_row", True, "torchao", {"backend": "fp8_dynamic_row", "skip_sensitive": False}),
    ("ptq int8_w8a8 dynamic", False, "ptq", {"format": "int8_w8a8", "act": "dynamic"}),
    ("ptq int4_weight_only dequant", False, "ptq", {"format": "int4_weight_only", "group_size": 128,
                                                    "int4_kernel": "dequant"}),
    ("torchao int8_dynamic", True, "torchao", {"backend": "int8_dynamic", "skip_sensitive": False}),
    ("ptq int4_weight_only tinygemm", False, "ptq", {"format": "int4_weight_only", "group_size": 128,
                                                     "int4_kernel": "tinygemm"}),
)


def picked(cname: str, selected: list[str]) -> bool:
    """``--configs`` entries select configs by substring, or exactly with a leading ``=``."""
    return any(cname == s[1:] if s.startswith("=") else s in cname for s in selected)


def log(msg: str) -> None:
    print(f"[quant {time.perf_counter() - _T0:6.1f}s] {msg}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None)
    p.add_argument("--stages", default="fidelity,speed")
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--calib-seeds", type=int, default=16)
    p.add_argument("--groups", type=int, default=5, help="timestep groups of the static scales")
    p.add_argument("--mixed-budget", type=float, default=0.4, help="mixed precision: fraction of the float weight size")
    p.add_argument("--configs", default=None, help="comma-separated substrings (or =exact names): only configs whose name matches")
    p.add_argument("--dit-batches", default="64,1")
    p.add_argument("--flux-batch", type=int, default=2)
    p.add_argument("--flux-blocks", default="2,4", help="double,single blocks of the FLUX-width config")
    p.add_argument("--speed-models", default="dit-xl-2,flux-width")
    p.add_argument("--no-compile", action="store_true", help="speed stage eager only")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--profile", action="store_true",
                   help="speed stage: record each config's top device kernels (one profiled call) in its row")
    p.add_argument("--compile-scope", choices=("model", "blocks"), default="model",
                   help="speed stage: torch.compile the whole transformer (one graph per config, ~10-30 s) or "
                        "each block (regional)")
    p.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune",
                                                                  "max-autotune-no-cudagraphs"),
                   help="torch.compile mode of every compiled row (reduce-overhead: CUDA graphs, no launch overhead)")
    p.add_argument("--tune-kernels", action="store_true",
                   help="compile every row with Inductor coordinate-descent tuning (torchao's process-wide default)")
    p.add_argument("--out", default="benchmarks/results/quantization.json")
    p.add_argument("--plot", default=None)
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--hard-limit-s", type=float, default=480.0)
    return p.parse_args(argv)


# ---- helpers ---------------------------------------------------------------------------------------

def traced_ops(fn: Callable[[], Any], device: torch.device) -> dict[str, list[float]]:
    """``{op or kernel name: [device ms, calls]}`` of one profiled ``fn()`` call (CPU ops included,
    with 0 device time on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for e in prof.events():
        acc = totals.setdefault(e.name, [0.0, 0])
        acc[0] += (getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0) or 0.0) / 1000.0
        acc[1] += 1
    return totals


def low_precision_ops(fn: Callable[[], Any] | None, device: torch.device,
                      ops: dict[str, list[float]] | None = None) -> list[str]:
    """Names of low-bit GEMM ops/kernels seen in a profiler trace of ``fn()`` (or in ``ops``, a
    :func:`traced_ops` result already taken)."""
    ops = ops if ops is not None else traced_ops(fn, device)
    return sorted(name for name in ops if LOWP.search(name))[:6]


def kernel_profile(ops: dict[str, list[float]], top: int = 12) -> list[dict[str, Any]]:
    """The ``top`` entries of a :func:`traced_ops` result by device time (``--profile``): where a
    config's step time goes, e.g. GEMM vs activation-quantization kernels when comparing with torchao.
    (Device time is counted on both a CPU op and the kernels it launches; the kernels rank first.)"""
    ranked = sorted(((n, v) for n, v in ops.items() if v[0] > 0), key=lambda kv: kv[1][0], reverse=True)[:top]
    return [{"kernel": name[:120], "ms": round(v[0], 4), "calls": int(v[1])} for name, v in ranked]


def weight_mb(model: torch.nn.Module) -> float:
    """Parameters and buffers of the model in MiB, quantized weights by their packed storage."""
    from diffspeed.methods.quantize import model_nbytes

    return model_nbytes(model) / 2**20


def apply_config(model: torch.nn.Module, kind: str, settings: dict[str, Any], stats_path: str | None,
                 gptq_calib: dict[str, Any] | None = None) -> dict[str, Any]:
    """Quantize ``model`` in place as ``kind`` says; ``ptq_gptq`` also needs ``gptq_calib`` (the loaded
    bundle whose transformer ``model`` is, plus ``ptq_gptq_``'s seeds/labels/num_steps/guidance_scale)."""
    if kind == "none":
        return {}
    if kind == "torchao":
        from diffspeed.methods.quantize import QuantizeConfig, quantize_model_

        report = quantize_model_(model, QuantizeConfig(**settings))
        return {"layers_quantized": len(report.quantized)}
    from diffspeed.methods.ptq import PTQConfig, ptq_gptq_, ptq_model_

    if kind == "ptq_gptq":
        if gptq_calib is None:
            raise ValueError("ptq_gptq configs need gptq_calib")
        report = ptq_gptq_(config=PTQConfig(**settings, gptq=True), **gptq_calib)
        return {"layers_quantized": len(report.quantized), "kernels": sorted(set(report.kernels.values()))}
    kw = dict(settings)
    if kw.get("act") == "static" or kw.get("smooth_alpha") is not None:
        kw["calibration"] = stats_path
    report = ptq_model_(model, PTQConfig(**kw))
    return {"layers_quantized": len(report.quantized), "kernels": sorted(set(report.kernels.values()))
            if isinstance(getattr(report, "kernels", None), dict) else None}


def compile_model(model: torch.nn.Module, scope: str = "model", tune: bool = False, mode: str = "default") -> None:
    """diffspeed's ``compile`` method, so rows measure what a recipe runs: ``model`` = the whole
    transformer call as one graph (what dense_baseline measures), ``blocks`` = regional compile;
    ``tune`` = Inductor's coordinate-descent kernel tuning (what torchao's configs switch on
    process-wide), for every row alike. CUDA-graph modes clone each output (the method does it)."""
    import diffspeed
    from diffspeed.methods import CompileConfig

    diffspeed.apply(model, CompileConfig(mode=mode, scope=scope, tune_kernels=tune))


# ---- fidelity stage --------------------------------------------------------------------------------

def fidelity_stage(args, device, dtype, rows, budget_left, selected) -> None:
    from diffspeed.bench.metrics import psnr, ssim
    from diffspeed.bench.timing import time_callable
    from diffspeed.models.judge import judge_accuracy, load_judge
    from diffspeed.models.loading import load_model
    from diffspeed.quant.calibration import calibrate
    from diffspeed.sampler import generate

    name = "reference-image"
    judge = load_judge("judge-image", device=device)

    def fresh():
        return load_model(name, device=device, dtype=dtype)

    base = fresh()
    n_cls = len(base.class_names)
    labels = [i % n_cls for i in range(args.samples)]
    seeds = list(range(1000, 1000 + args.samples))
    calib_seeds = list(range(5000, 5000 + args.calib_seeds))
    calib_labels = [i % n_cls for i in range(args.calib_seeds)]
    kw = dict(num_steps=args.steps, guidance_scale=args.guidance)

    def run(loaded) -> torch.Tensor:
        return generate(loaded, labels, seeds, **kw).float()

    def run_peak(loaded) -> tuple[torch.Tensor, float | None]:
        """Generate once, with the peak CUDA memory of the generation (None on CPU)."""
        from diffspeed.bench.timing import track_peak_memory

        with track_peak_memory(device) as peak:
            out = run(loaded)
        return out, peak["peak_mb"]

    def step_ms(loaded) -> float:
        """One transformer call at the CFG-doubled sampling batch (the DiT reference model's inputs)."""
        x = torch.randn(len(labels) * 2, *loaded.latent_shape, device=device, dtype=dtype)
        tr = loaded.transformer
        kwargs = {"timestep": torch.full((x.shape[0],), 500.0, device=device),
                  "class_labels": torch.tensor(labels + labels, device=device), "return_dict": False}

        def call():
            with torch.no_grad():
                tr(x, **kwargs)

        return time_callable(call, warmup=2, repeats=args.repeats, device=device).median_ms

    t0 = time.perf_counter()
    full, full_peak = run_peak(base)
    full_acc = judge_accuracy(judge, full, labels)
    full_ms = step_ms(base)
    log(f"{name} full: judge {full_acc:.3f}, step {full_ms:.2f} ms at batch {2 * args.samples} (CFG), "
        f"{time.perf_counter() - t0:.1f}s")
    common = {"model": name, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "batch": args.samples, "steps": args.steps, "guidance": args.guidance, "compiled": False,
              "dtype": str(dtype).replace("torch.", "")}
    rows.append({**common, "config": "bf16" if dtype == torch.bfloat16 else "float", "peer": False,
                 "low_precision_kernel": False, "speedup": 1.0, "step_ms": full_ms, "weight_mb": weight_mb(base.transformer),
                 "peak_mem_mb": full_peak, "psnr_db": None, "ssim": 1.0, "judge_accuracy": full_acc, "stage": "fidelity"})

    stats_file = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False).name
    t0 = time.perf_counter()
    calibrate(base, seeds=calib_seeds, labels=calib_labels, steps=args.steps, guidance=args.guidance,
              num_groups=args.groups, progress=False).save(stats_file)
    log(f"activation stats from {len(calib_seeds)} calibration seeds x {args.steps} steps: {time.perf_counter() - t0:.1f}s")
    del base

    worst: tuple[float, str, dict] | None = None
    for cname, peer, kind, settings in FIDELITY_CONFIGS:
        if selected and not picked(cname, selected):
            continue
        if budget_left() <= 0:
            log(f"budget: skipping {cname}")
            continue
        row = {**common, "config": cname, "peer": peer, "settings": settings, "stage": "fidelity"}
        try:
            loaded = fresh()
            info = apply_config(loaded.transformer, kind, settings, stats_file, gptq_calib={
                "loaded": loaded, "seeds": calib_seeds, "labels": calib_labels, "num_steps": args.steps,
                "guidance_scale": args.guidance})
            out, peak_mb = run_peak(loaded)
            ms = step_ms(loaded)
            ops = low_precision_ops(lambda: generate(loaded, labels[:2], seeds[:2], num_steps=1), device)
            p = psnr(out, full)
            row.update(info, psnr_db=p, ssim=ssim(out, full), judge_accuracy=judge_accuracy(judge, out, labels),
                       step_ms=ms, speedup=full_ms / ms, weight_mb=weight_mb(loaded.transformer), peak_mem_mb=peak_mb,
                       low_precision_kernel=bool(ops), low_precision_ops=ops, error=None)
            if kind == "ptq" and (worst is None or p < worst[0]):
                worst = (p, cname, settings)
        except Exception as exc:  # noqa: BLE001 - one failed config is a row, not a crash
            row.update(error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300], low_precision_kernel=False,
                       speedup=None, psnr_db=None, judge_accuracy=None, weight_mb=None, peak_mem_mb=None)
        rows.append(row)
        log(f"{cname:34s} psnr {row.get('psnr_db')} judge {row.get('judge_accuracy')} step {row.get('step_ms')} "
            f"weight {row.get('weight_mb')} lowp {row.get('low_precision_ops')} {row.get('error') or ''}")
        gc.collect()

    # cumulative error compensation on the lowest-fidelity ptq config
    if worst is not None and budget_left() > 0 and (not selected or "comp" in selected):
        from diffspeed import apply
        from diffspeed.methods.error_compensation import ErrorCompensationConfig
        from diffspeed.quant.compensation import calibrate_compensation

        _, cname, settings = worst
        row = {**common, "config": f"{cname} +comp", "peer": False, "settings": {**settings, "compensation": True},
               "stage": "fidelity"}
        try:
            full_model = fresh()
            loaded = fresh()
            apply_config(loaded.transformer, "ptq", settings, stats_file)
            t0 = time.perf_counter()
            table = calibrate_compensation(full_model.transformer, loaded.transformer, loaded=full_model,
                                           seeds=calib_seeds, labels=calib_labels, num_steps=args.steps,
                                           guidance_scale=args.guidance)
            table_file = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
            table.save(table_file)
            calib_s = time.perf_counter() - t0
            gen_plain = time_callable(lambda: run(loaded), warmup=1, repeats=3, device=device).median_ms
            handle = apply(loaded.transformer, ErrorCompensationConfig(table=table_file))
            out = run(loaded)
            gen_comp = time_callable(lambda: run(loaded), warmup=1, repeats=3, device=device).median_ms
            row.update(psnr_db=psnr(out, full), ssim=ssim(out, full), judge_accuracy=judge_accuracy(judge, out, labels),
                       weight_mb=weight_mb(loaded.transformer), peak_mem_mb=None, speedup=None,
                       low_precision_kernel=True, compensation_calib_s=calib_s,
                       generation_ms_without=gen_plain, generation_ms_with=gen_comp,
                       overhead_pct=100.0 * (gen_comp - gen_plain) / gen_plain,
                       psnr_gain_db=psnr(out, full) - worst[0], error=None)
            handle.remove()
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            row.update(error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300], low_precision_kernel=False,
                       speedup=None, psnr_db=None, judge_accuracy=None, weight_mb=None, peak_mem_mb=None)
        rows.append(row)
        log(f"{row['config']:34s} psnr {row.get('psnr_db')} gain {row.get('psnr_gain_db')} overhead "
            f"{row.get('overhead_pct')}% {row.get('error') or ''}")

    # mixed precision under a weight-size budget
    if budget_left() > 0 and (not selected or "mixed" in selected):
        from diffspeed.quant.mixed_precision import (
            apply_plan_, assign_bits, capture_calib_inputs, layer_sensitivity, linear_fqns, measure_layer_bytes)

        row = {**common, "config": f"mixed int8_w8a8/int4 <= {args.mixed_budget:.0%} of float", "peer": False,
               "stage": "fidelity"}
        try:
            loaded = fresh()
            model = loaded.transformer
            from diffspeed.methods.quantize import sensitive_reason

            fqns = linear_fqns(model, include=lambda f, m: sensitive_reason(f) is None)
            cands = ["int8_w8a8", "int4_weight_only"]
            calib = capture_calib_inputs(loaded, seeds=calib_seeds[:4], labels=calib_labels[:4], num_steps=args.steps,
                                         guidance_scale=args.guidance, shift=1.0, keep_steps=4)
            sens = layer_sensitivity(model, fqns, cands, calib, progress=False)
            sizes = measure_layer_bytes(model, fqns, cands)
            float_bytes = sum(s["none"] for s in sizes.values())
            plan = assign_bits(sens, sizes, budget_mb=args.mixed_budget * float_bytes / 1e6)
            apply_plan_(model, plan)
            out = run(loaded)
            ms = step_ms(loaded)
            counts: dict[str, int] = {}
            for f in plan.formats.values():
                counts[f] = counts.get(f, 0) + 1
            row.update(settings={"budget_fraction": args.mixed_budget, "formats": counts},
                       psnr_db=psnr(out, full), ssim=ssim(out, full), judge_accuracy=judge_accuracy(judge, out, labels),
                       step_ms=ms, speedup=full_ms / ms, weight_mb=weight_mb(model), peak_mem_mb=None,
                       planned_layer_bytes=plan.predicted_bytes, float_layer_bytes=float_bytes,
                       low_precision_kernel=True, error=None)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            row.update(error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300], low_precision_kernel=False,
                       speedup=None, psnr_db=None, judge_accuracy=None, weight_mb=None, peak_mem_mb=None)
        rows.append(row)
        log(f"{row['config']:34s} psnr {row.get('psnr_db')} weight {row.get('weight_mb')} {row.get('error') or ''}")


# ---- speed stage -----------------------------------------------------------------------------------

def flux_width(device, dtype, blocks: tuple[int, int], seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: ~1.2 B parameters
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=blocks[0], num_single_layers=blocks[1],
                                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                       pooled_projection_dim=768, guidance_embeds=False)
    return model.to(device=device, dtype=dtype).eval()


def model_label(name: str, blocks: tuple[int, int]) -> str:
    return f"flux-width ({blocks[0]}+{blocks[1]} blocks)" if name == "flux-width" else name


def build_speed_model(name: str, device, dtype, blocks: tuple[int, int]) -> torch.nn.Module:
    """A real-size random-weight transformer: ``dit-xl-2`` or the ``flux-width`` config."""
    if name == "dit-xl-2":
        from diffspeed.models.zoo import build_model

        return build_model(name, device=device, dtype=dtype).transformer
    return flux_width(device, dtype, blocks)


def speed_inputs(name: str, model, batch: int, device, dtype) -> dict[str, Any]:
    g = torch.Generator(device=device).manual_seed(0)
    if name == "dit-xl-2":
        return {"hidden_states": torch.randn(batch, 4, 32, 32, device=device, dtype=dtype, generator=g),
                "timestep": torch.full((batch,), 500, device=device, dtype=torch.long),
                "class_labels": torch.arange(batch, device=device) % 1000, "return_dict": False}
    img, txt = 4096, 512
    return {"hidden_states": torch.randn(batch, img, 64, device=device, dtype=dtype, generator=g),
            "encoder_hidden_states": torch.randn(batch, txt, 4096, device=device, dtype=dtype, generator=g),
            "pooled_projections": torch.randn(batch, 768, device=device, dtype=dtype, generator=g),
            "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
            "img_ids": torch.zeros(img, 3, device=device, dtype=dtype),
            "txt_ids": torch.zeros(txt, 3, device=device, dtype=dtype), "return_dict": False}


def speed_stage(args, device, dtype, rows, budget_left, selected) -> None:
    from diffspeed.bench.timing import time_callable, track_peak_memory

    # order = priority under the time budget: the models in --speed-models order, each DiT batch in turn
    models = [m for m in args.speed_models.split(",") if m]
    cases: list[tuple[str, int]] = []
    for m in models:
        if m == "dit-xl-2":
            cases += [("dit-xl-2", int(b)) for b in args.dit_batches.split(",") if b]
        elif m == "flux-width":
            cases.append(("flux-width", args.flux_batch))
    blocks = tuple(int(x) for x in args.flux_blocks.split(","))
    compile_modes = [False] if args.no_compile or device.type != "cuda" else [True]
    pristine: dict[str, Any] = {}
    for name, batch in cases:
        for compiled in compile_modes:
            base_ms = None
            for cname, peer, kind, settings in SPEED_CONFIGS:
                if selected and cname != "bf16" and not picked(cname, selected):
                    continue
                if budget_left() <= 0:
                    log(f"budget: skipping {name} b{batch} {cname}")
                    continue
                row = {"model": model_label(name, blocks),
                       "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "batch": batch,
                       "config": cname, "peer": peer, "compiled": compiled, "settings": settings, "stage": "speed",
                       "tuned_kernels": bool(compiled and args.tune_kernels),
                       "compile_scope": args.compile_scope if compiled else None,
                       "compile_mode": args.compile_mode if compiled else None,
                       "psnr_db": None, "judge_accuracy": None}
                t0 = time.perf_counter()
                try:
                    if name not in pristine:  # build once on the device, deep-copy per config
                        for key in [k for k in pristine if not isinstance(k, tuple) and k != name]:
                            del pristine[key]  # the previous case's model
                        pristine[name] = build_speed_model(name, device, dtype, blocks)
                        log(f"built {name} in {time.perf_counter() - t0:.1f}s")
                    log(f"{name} b{batch} {cname}: start")
                    model = copy.deepcopy(pristine[name]).eval()
                    row.update(apply_config(model, kind, settings, None))
                    inputs = speed_inputs(name, model, batch, device, dtype)
                    ref_out = None
                    if compiled:
                        compile_model(model, args.compile_scope, args.tune_kernels, args.compile_mode)

                    def call():
                        with torch.no_grad():
                            return model(**inputs)

                    call()
                    with track_peak_memory(device) as peak:
                        ref_out = call()[0]
                    timing = time_callable(call, warmup=3, repeats=args.repeats, device=device)
                    trace = traced_ops(call, device)
                    ops = low_precision_ops(None, device, trace)
                    if args.profile:
                        row["kernel_profile"] = kernel_profile(trace)
                    if base_ms is None and kind == "none":
                        base_ms = timing.median_ms
                        pristine[(name, batch, "out")] = ref_out.float()
                    base_out = pristine.get((name, batch, "out"))
                    rel = None
                    if base_out is not None and kind != "none":
                        rel = float((ref_out.float() - base_out).norm() / base_out.norm())
                    row.update(latency_ms=timing.median_ms, speedup=(base_ms / timing.median_ms) if base_ms else None,
                               weight_mb=weight_mb(model), peak_mem_mb=peak["peak_mb"], low_precision_kernel=bool(ops),
                               low_precision_ops=ops, rel_error_vs_bf16=rel, error=None)
                    del model, inputs, ref_out
                except Exception as exc:  # noqa: BLE001
                    row.update(error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300], low_precision_kernel=False,
                               speedup=None, latency_ms=None, weight_mb=None, peak_mem_mb=None)
                row["row_s"] = round(time.perf_counter() - t0, 1)
                rows.append(row)
                log(f"{row['model']} b{batch} {'compiled' if compiled else 'eager'} {cname:26s} "
                    f"{row.get('latency_ms')} ms x{row.get('speedup')} weight {row.get('weight_mb')} MB "
                    f"lowp {row.get('low_precision_ops')} {row.get('error') or ''} ({row['row_s']}s)")
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()


def size_stage(args, device, dtype, rows, budget_left, selected) -> None:
    """Transformer weight bytes per format for the ``--speed-models`` configs (real size, random
    weights, bf16): the int4 target is about the whole transformer, which the default layer selection
    (adaLN modulation kept in bf16) does not reach on DiT-XL/2."""
    from diffspeed.methods.ptq import PTQConfig, ptq_model_

    blocks = tuple(int(x) for x in args.flux_blocks.split(","))
    for name in [m for m in args.speed_models.split(",") if m]:
        pristine = build_speed_model(name, device, torch.bfloat16, blocks)
        label = model_label(name, blocks)
        base = weight_mb(pristine)
        for cname, settings in SIZE_CONFIGS:
            if selected and cname != "bf16" and not picked(cname, selected):
                continue
            row = {"model": label, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                   "config": cname, "peer": False, "settings": settings or {}, "stage": "size", "dtype": "bfloat16"}
            model = copy.deepcopy(pristine)
            if settings:
                report = ptq_model_(model, PTQConfig(**settings))
                row.update(layers_quantized=len(report.quantized), layers_kept=len(report.skipped),
                           quantized_layers_mb=report.quantized_bytes_after / 2**20,
                           quantized_layers_bf16_mb=report.quantized_bytes_before / 2**20)
            row.update(weight_mb=weight_mb(model), bf16_weight_mb=base)
            row["size_ratio_vs_bf16"] = base / row["weight_mb"]
            rows.append(row)
            log(f"size {label} {cname:56s} {row['weight_mb']:8.1f} MB  x{row['size_ratio_vs_bf16']:.2f} smaller")
            del model
            gc.collect()
        del pristine


def make_plot(rows: list[dict[str, Any]], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    fid = [r for r in rows if r.get("stage") == "fidelity" and r.get("psnr_db") is not None and r.get("weight_mb")]
    for r in fid:
        axes[0].scatter(r["weight_mb"], r["psnr_db"], marker="s" if r["peer"] else "o",
                        color="tab:gray" if r["peer"] else "tab:blue")
        axes[0].annotate(r["config"].replace("ptq ", "").replace("torchao ", "ao "), (r["weight_mb"], r["psnr_db"]),
                         fontsize=6)
    axes[0].set_xlabel("transformer weight MB")
    axes[0].set_ylabel("PSNR vs unquantized (dB)")
    axes[0].set_title("reference-image: size vs fidelity (squares: torchao)")
    sp = [r for r in rows if r.get("stage") == "speed" and r.get("speedup")]
    labels = [f"{r['model'].split(' ')[0]} b{r['batch']}\n{r['config'].replace('ptq ', '').replace('torchao ', 'ao ')}"
              for r in sp]
    axes[1].barh(range(len(sp)), [r["speedup"] for r in sp],
                 color=["tab:gray" if r["peer"] else "tab:blue" for r in sp])
    axes[1].set_yticks(range(len(sp)), labels, fontsize=5)
    axes[1].axvline(1.0, color="k", lw=0.8)
    axes[1].set_xlabel("speedup vs bf16 (same compile setting)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    stages = [s for s in args.stages.split(",") if s]
    selected = [s for s in (args.configs or "").split(",") if s]
    rows: list[dict[str, Any]] = []

    def budget_left() -> float:
        return args.budget_s - (time.perf_counter() - _T0)

    def _finish(truncated: bool) -> None:
        meta = {"command": " ".join(["python", "benchmarks/quantization.py", *(argv if argv is not None else sys.argv[1:])]),
                "torch": torch.__version__, "truncated": truncated, "elapsed_s": round(time.perf_counter() - _T0, 1)}
        try:
            import torchao

            meta["torchao"] = torchao.__version__
        except Exception:  # noqa: BLE001
            meta["torchao"] = None
        for r in rows:
            r.setdefault("meta", meta) if r is rows[0] else None
        write_json(rows, args.out)
        if args.plot:
            make_plot(rows, args.plot)
        log(f"wrote {len(rows)} rows to {args.out} (truncated={truncated})")

    finish = once(_finish)
    start_watchdog(args.hard_limit_s, _T0, finish, log)
    try:  # the peers are torchao's configs: say so up front instead of leaving only error rows
        import torchao  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        log(f"WARNING: torchao does not import ({type(exc).__name__}: {exc}); the torchao peer rows will be "
            "error rows, not measurements (on the GPU machine carry its wheel in .whl/)")
    for stage in stages:
        if stage == "fidelity":
            fidelity_stage(args, device, dtype, rows, budget_left, selected)
        elif stage == "speed":
            speed_stage(args, device, dtype, rows, budget_left, selected)
        elif stage == "size":
            size_stage(args, device, dtype, rows, budget_left, selected)
        else:
            raise SystemExit(f"unknown stage {stage!r}; use fidelity,speed,size")
    finish(budget_left() <= 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
