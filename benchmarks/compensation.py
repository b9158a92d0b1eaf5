#!/usr/bin/env python
"""How much cumulative error compensation recovers, by quantizer strength (CPU, fidelity only).

On ``reference-image`` (fp32, CPU), the transformer blocks' linear weights are rounded to 4 bits in
fp32 (the values a 4-bit kernel would multiply by; no low-bit kernel runs, so no speed is measured):

* ``int4-g32``: asymmetric 4-bit per group of 32 input channels (the numerics of torch's int4 kernel
  at group 32, the ``ptq_ int4_weight_only g32`` row of ``quantization.json``);
* ``int4-row``: symmetric 4-bit per output row (no groups: the lossiest 4-bit setting).

For each, :func:`diffspeed.quant.compensation.calibrate_compensation` is fitted on ``--calib``
calibration seeds and the final images of ``--eval`` *other* seeds are compared with the full
model's (PSNR), without and with the ``error_compensation`` method (rows ``method: "velocity"``).

``--gptq`` settings (rows ``method: "gptq"``) compare ``ptq_`` itself (int4 with the dequant kernel,
int8 W8A8 dynamic; sensitive layers kept in float as by default) rounded to nearest vs rounded with
GPTQ's error feedback (:func:`diffspeed.methods.ptq.ptq_gptq_`, second moments from the same
calibration seeds over every step). Writes a JSON list of rows.

    python benchmarks/compensation.py --out benchmarks/results/compensation_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import diffspeed
from diffspeed.bench.metrics import psnr
from diffspeed.bench.runner import write_json
from diffspeed.bench.script import command_meta
from diffspeed.methods.error_compensation import ErrorCompensationConfig
from diffspeed.models.loading import load_model
from diffspeed.quant.compensation import calibrate_compensation
from diffspeed.sampler import generate


class RoundedLinear(nn.Module):
    """A linear whose weight is rounded to ``bits`` bits per group (``group`` input channels; 0 = a whole
    row, symmetric) and kept in fp32."""

    def __init__(self, lin: nn.Linear, bits: int, group: int) -> None:
        super().__init__()
        w = lin.weight.detach().float()
        n, k = w.shape
        if group:
            wg = w.reshape(n, k // group, group)
            lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
            scale = (hi - lo).clamp_min(1e-8) / (2**bits - 1)
            w = (torch.round((wg - lo) / scale).clamp(0, 2**bits - 1) * scale + lo).reshape(n, k)
        else:
            qmax = 2 ** (bits - 1) - 1
            scale = w.abs().amax(1, keepdim=True).clamp_min(1e-8) / qmax
            w = torch.round(w / scale).clamp(-qmax - 1, qmax) * scale
        self.register_buffer("weight", w)
        self.bias = lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)


def round_blocks(model: nn.Module, bits: int, group: int) -> nn.Module:
    for name, mod in list(model.named_modules()):
        if not name.startswith("transformer_blocks"):
            continue
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear):
                setattr(mod, child_name, RoundedLinear(child, bits, group))
    return model


def gptq_row(item: str, loaded, cal: list[int], ev: list[int], labels, guidance: float) -> dict:
    from diffspeed.methods.ptq import PTQConfig, ptq_gptq_, ptq_model_

    name, steps = item.split(":")
    steps = int(steps)
    settings = {"int4-g32": dict(format="int4_weight_only", group_size=32, int4_kernel="dequant"),
                "int4-g64": dict(format="int4_weight_only", group_size=64, int4_kernel="dequant"),
                "int8-dyn": dict(format="int8_w8a8")}[name]
    t0 = time.perf_counter()
    kw = dict(num_steps=steps, guidance_scale=guidance)
    ref = generate(loaded, labels(ev), ev, **kw)
    rtn = copy.copy(loaded)
    rtn.transformer = copy.deepcopy(loaded.transformer)
    report = ptq_model_(rtn.transformer, PTQConfig(**settings))
    plain = generate(rtn, labels(ev), ev, **kw)
    fed = copy.copy(loaded)
    fed.transformer = copy.deepcopy(loaded.transformer)
    ptq_gptq_(fed, PTQConfig(**settings, gptq=True), seeds=cal, labels=labels(cal), **kw)
    comp = generate(fed, labels(ev), ev, **kw)
    row = {"model": "reference-image", "device": "cpu", "dtype": "float32", "quantizer": f"ptq {name}",
           "method": "gptq", "settings": settings, "layers_quantized": len(report.quantized),
           "note": "ptq_ on real kernels (int4: dequant kernel; int8: torch._int_mm); fidelity only",
           "steps": steps, "guidance": guidance, "calib_seeds": cal, "eval_seeds": [ev[0], ev[-1]],
           "psnr_db_plain": psnr(plain, ref), "psnr_db_compensated": psnr(comp, ref),
           "row_s": round(time.perf_counter() - t0, 1)}
    row["psnr_gain_db"] = row["psnr_db_compensated"] - row["psnr_db_plain"]
    print(f"gptq {name} {steps} steps: round-to-nearest {row['psnr_db_plain']:.2f} dB, GPTQ "
          f"{row['psnr_db_compensated']:.2f} dB ({row['psnr_gain_db']:+.2f}), {row['row_s']} s", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="int4-g32:25,int4-row:10", help="velocity compensation: name:steps,... ('' = none)")
    p.add_argument("--gptq", default="int4-g32:25,int4-g64:25,int8-dyn:25", help="GPTQ rows: name:steps,... ('' = none)")
    p.add_argument("--calib", type=int, default=8)
    p.add_argument("--eval", type=int, default=16)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--out", default="benchmarks/results/compensation_cpu.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    loaded = load_model("reference-image")
    n_cls = len(loaded.class_names)
    cal = list(range(args.calib))
    ev = list(range(100, 100 + args.eval))
    labels = lambda seeds: [s % n_cls for s in seeds]  # noqa: E731
    rows = []
    for item in [i for i in args.gptq.split(",") if i]:
        rows.append(gptq_row(item, loaded, cal, ev, labels, args.guidance))
    for item in [i for i in args.settings.split(",") if i]:
        name, steps = item.split(":")
        steps = int(steps)
        group = {"int4-g32": 32, "int4-row": 0}[name]
        t0 = time.perf_counter()
        kw = dict(num_steps=steps, guidance_scale=args.guidance)
        ref = generate(loaded, labels(ev), ev, **kw)
        quant = copy.copy(loaded)
        quant.transformer = round_blocks(copy.deepcopy(loaded.transformer), 4, group)
        plain = generate(quant, labels(ev), ev, **kw)
        table = calibrate_compensation(loaded.transformer, quant.transformer, loaded=loaded, seeds=cal,
                                       labels=labels(cal), num_steps=steps, guidance_scale=args.guidance)
        path = Path(tempfile.mkdtemp()) / "table.json"
        table.save(path)
        with diffspeed.apply(quant.transformer, ErrorCompensationConfig(table=str(path))) as h:
            comp = generate(quant, labels(ev), ev, **kw)
            corrected = h.stats["steps_corrected"]
        row = {"model": "reference-image", "device": "cpu", "dtype": "float32", "quantizer": name, "method": "velocity",
               "note": "weights rounded to 4 bits in fp32 (no low-bit kernel): fidelity only",
               "steps": steps, "guidance": args.guidance, "calib_seeds": cal, "eval_seeds": [ev[0], ev[-1]],
               "psnr_db_plain": psnr(plain, ref), "psnr_db_compensated": psnr(comp, ref),
               "steps_corrected": corrected, "row_s": round(time.perf_counter() - t0, 1)}
        row["psnr_gain_db"] = row["psnr_db_compensated"] - row["psnr_db_plain"]
        rows.append(row)
        print(f"{name} {steps} steps: plain {row['psnr_db_plain']:.2f} dB, compensated "
              f"{row['psnr_db_compensated']:.2f} dB ({row['psnr_gain_db']:+.2f}), {row['row_s']} s", flush=True)
    rows[0]["meta"] = command_meta("benchmarks/compensation.py", argv)
    write_json(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
