"""Where an FP8 transformer step's time goes: ours vs torchao, kernel by kernel, on short models.

Why: ``quantization.py`` compiles whole 28-block DiT-XL/2 models (torchao's takes ~5 min to compile),
too slow to try several variants of the FP8 path inside one device call. Step time is a sum over
identical blocks, so a DiT-XL/2 cut to a few blocks (and the FLUX-width config) shows the same
per-block differences in seconds. Each config is compiled whole-model (``dynamic=False``), timed with
CUDA events, and profiled once; the top kernels by device time go into the JSON.

    python benchmarks/fp8_diag.py --out fp8_diag.json   # needs a CUDA GPU with FP8 (sm89+)

Variants of our path: ``ours fp8`` is the shipped ``QuantLinear`` (FFN GELU fused into a one-pass
row-wise quantization kernel, other inputs quantized by Inductor-fused torch ops); ``all-op`` uses the
kernel for every input; ``no-gelu-fusion`` keeps the GELU separate; ``inductor-quant`` is
the session-4 path (quantization as torch ops that Inductor fuses into their producers);
``+fuse_qkv`` fuses q/k/v before quantizing (one activation quantization and one GEMM per attention).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantization import (  # noqa: E402
    apply_config,
    compile_model,
    flux_width,
    kernel_profile,
    speed_inputs,
    traced_ops,
)

CONFIGS: dict[str, tuple[str, dict[str, Any], bool, str]] = {
    # name -> (kind, settings, fuse_qkv first, formats.FP8_ACT_KERNEL)
    "bf16": ("none", {}, False, "auto"),
    "bf16+fuse_qkv": ("none", {}, True, "auto"),
    "ours fp8": ("ptq", {"format": "fp8_w8a8", "act": "dynamic"}, False, "auto"),
    "ours fp8+fuse_qkv": ("ptq", {"format": "fp8_w8a8", "act": "dynamic"}, True, "auto"),
    "torchao fp8_dynamic_row": ("torchao", {"backend": "fp8_dynamic_row", "skip_sensitive": False}, False, "auto"),
    "ours fp8 no-gelu-fusion": ("ptq", {"format": "fp8_w8a8", "act": "dynamic", "fuse_gelu": False}, False, "auto"),
    "ours fp8 all-op": ("ptq", {"format": "fp8_w8a8", "act": "dynamic"}, False, "op"),
    "ours fp8 inductor-quant": ("ptq", {"format": "fp8_w8a8", "act": "dynamic", "fuse_gelu": False}, False, "inductor"),
    "ours int8_w8a8": ("ptq", {"format": "int8_w8a8", "act": "dynamic"}, False, "auto"),
    "ours int4 dequant": ("ptq", {"format": "int4_weight_only", "group_size": 128, "int4_kernel": "dequant"}, False,
                          "auto"),
}


def build(name: str, blocks: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    if name == "dit-xl-2":
        from diffspeed.models.zoo import build_model

        model = build_model(name, device=device, dtype=dtype).transformer
        model.transformer_blocks = torch.nn.ModuleList(list(model.transformer_blocks)[:blocks])
        return model.eval()
    return flux_width(device, dtype, (1, 2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="dit-xl-2,flux-width")
    p.add_argument("--dit-blocks", type=int, default=4)
    p.add_argument("--dit-batch", type=int, default=64)
    p.add_argument("--flux-batch", type=int, default=2)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--top", type=int, default=14)
    p.add_argument("--budget-s", type=float, default=480.0)
    p.add_argument("--tune-kernels", action="store_true", help="Inductor coordinate-descent tuning, every row")
    p.add_argument("--out", default="fp8_diag.json")
    args = p.parse_args(argv)
    from diffspeed.adapters import get_adapter
    from diffspeed.bench.timing import time_callable
    from diffspeed.methods.fuse_qkv import FuseQKVConfig, apply_fuse_qkv

    device, dtype = torch.device("cuda"), torch.bfloat16
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for mname in [m for m in args.models.split(",") if m]:
        pristine = build(mname, args.dit_blocks, device, dtype)
        batch = args.dit_batch if mname == "dit-xl-2" else args.flux_batch
        base_ms, base_out = None, None
        for cname in [c for c in args.configs.split(",") if c]:
            if time.perf_counter() - t_start > args.budget_s:
                print(f"budget: skipping {mname} {cname}", flush=True)
                continue
            kind, settings, fuse, act_kernel = CONFIGS[cname]
            row: dict[str, Any] = {"model": mname, "blocks": args.dit_blocks if mname == "dit-xl-2" else "1+2",
                                   "batch": batch, "config": cname, "device": torch.cuda.get_device_name(),
                                   "tuned_kernels": args.tune_kernels}
            t0 = time.perf_counter()
            from diffspeed.quant import formats

            formats.FP8_ACT_KERNEL = act_kernel
            try:
                model = copy.deepcopy(pristine)
                if fuse:
                    apply_fuse_qkv(model, FuseQKVConfig(), get_adapter(model))
                apply_config(model, kind, settings, None)
                compile_model(model, "model", args.tune_kernels)
                inputs = speed_inputs(mname, model, batch, device, dtype)

                def call():
                    with torch.no_grad():
                        return model(**inputs)[0]

                out = call()
                timing = time_callable(call, warmup=3, repeats=args.repeats, device=device)
                trace = traced_ops(call, device)
                if cname == "bf16":
                    base_ms, base_out = timing.median_ms, out.float()
                rel = None if base_out is None else float((out.float() - base_out).norm() / base_out.norm())
                row.update(ms=timing.median_ms, speedup=None if base_ms is None else base_ms / timing.median_ms,
                           rel_error_vs_bf16=rel, kernels=kernel_profile(trace, args.top), error=None)
                del model, out
            except Exception as exc:  # noqa: BLE001
                row.update(error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
            finally:
                formats.FP8_ACT_KERNEL = "auto"
                torch._dynamo.reset()
            row["row_s"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(f"{mname} b{batch} {cname:26s} {row.get('ms')} ms x{row.get('speedup')} "
                  f"rel {row.get('rel_error_vs_bf16')} {row.get('error') or ''} ({row['row_s']}s)", flush=True)
            for k in row.get("kernels") or []:
                print(f"    {k['ms']:8.3f} ms {k['calls']:4d}x {k['kernel'][:100]}", flush=True)
            Path(args.out).write_text(json.dumps(rows, indent=1))
            gc.collect()
            torch.cuda.empty_cache()
        del pristine
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
