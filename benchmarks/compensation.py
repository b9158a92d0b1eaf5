#!/usr/bin/env python
"""How much cumulative error compensation recovers, by quantizer strength (CPU, fidelity only).

On ``reference-image`` (fp32, CPU), the transformer blocks' linear weights are rounded to 4 bits in
fp32 (the values a 4-bit kernel would multiply by; no low-bit kernel runs, so no speed is measured):

* ``int4-g32``: asymmetric 4-bit per group of 32 input channels (the numerics of torch's int4 kernel
  at group 32, the ``ptq_ int4_weight_only g32`` row of ``quantization.json``);
* ``int4-row``: symmetric 4-bit per output row (no groups: the lossiest 4-bit setting).

For each, :func:`diffspeed.quant.compensation.calibrate_compensation` is fitted on ``--calib``
calibration seeds and the final images of ``--eval`` *other* seeds are compared with the full
model's (PSNR), without and with the ``error_compensation`` method. Writes a JSON list of rows.

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="int4-g32:25,int4-row:10", help="name:steps,...")
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
    for item in args.settings.split(","):
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
        row = {"model": "reference-image", "device": "cpu", "dtype": "float32", "quantizer": name,
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
