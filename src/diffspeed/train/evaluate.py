"""Evaluate a trained reference model with its judge.

For each guidance scale: generate ``samples`` class-balanced samples with diffspeed's sampler
(flow-matching Euler, ``steps`` steps, batched classifier-free guidance), then report

* ``judge_accuracy``: fraction the judge classifies as the requested class (and per class);
* ``frechet_judge``: Frechet judge distance between the judge features of the samples and of
  ``samples`` held-out real samples; ``frechet_real_vs_real``: the same between two disjoint real
  sets of that size (the noise floor to compare with);
* for video, ``motion_generated`` / ``motion_real``: mean absolute frame-to-frame change of the
  pixels in [0, 1] (static clips score ~0);

writes a sample grid PNG (rows = classes), for video also a GIF of a few generated clips, and
merges the rows into a JSON list (a row with the same model/steps/guidance/samples/device is
replaced).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..data import clips, shapes
from ..errors import DiffspeedError
from ..media import make_grid
from .common import configure_backends, device_name, resolve_device

ROW_KEY = ("model", "steps", "guidance_scale", "num_samples", "device")


def save_labelled_grid(rows: list[torch.Tensor], names: list[str], path: str | os.PathLike, title: str,
                       scale: float = 0.35, xlabel: str | None = None) -> Path:
    """One row of (K, 3, H, W) images per class, labelled with the class names, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ncol = max(r.shape[0] for r in rows)
    h = rows[0].shape[2]
    blank = torch.ones(1, 3, h, rows[0].shape[3])
    padded = [torch.cat([r.cpu().float()] + [blank] * (ncol - r.shape[0])) for r in rows]
    grid = make_grid(torch.cat(padded), nrow=ncol, pad=1)
    fig_w = max(4.0, ncol * (h + 1) / 100 / scale + 1.5)
    fig_h = max(2.0, len(rows) * (h + 1) / 100 / scale + 0.6)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    ax.imshow(grid, interpolation="nearest")
    ax.set_yticks([1 + (h + 1) * i + h / 2 for i in range(len(rows))])
    ax.set_yticklabels(names)
    ax.set_xticks([])
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def save_gif(videos: torch.Tensor, path: str | os.PathLike, ncol: int = 4, scale: int = 4, ms: int = 120) -> Path:
    """(N, 3, F, H, W) clips in [0, 1] -> an animated GIF tiling them (nearest upscale)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = []
    for f in range(videos.shape[2]):
        img = Image.fromarray(make_grid(videos[:, :, f].cpu().float(), nrow=min(ncol, videos.shape[0]), pad=2))
        frames.append(img.resize((img.width * scale, img.height * scale), Image.NEAREST))
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms, loop=0)
    return path


def motion_energy(videos: torch.Tensor) -> float:
    """Mean |frame_{t+1} - frame_t| of (N, 3, F, H, W) pixels in [0, 1]."""
    return float((videos[:, :, 1:] - videos[:, :, :-1]).abs().mean())


def merge_rows(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """Merge ``rows`` into the JSON list at ``path`` (same key -> replaced), keeping other rows."""
    path = Path(path)
    existing: list[dict[str, Any]] = []
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            existing = data.get("rows", []) if isinstance(data, dict) else list(data)
        except (OSError, json.JSONDecodeError):
            existing = []

    def key(row: dict[str, Any]) -> tuple:
        return tuple(row.get(k) for k in ROW_KEY)

    new_keys = {key(r) for r in rows}
    merged = [r for r in existing if key(r) not in new_keys] + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2, default=str) + "\n")
    return path


def evaluate(
    model: str,
    *,
    samples: int = 1000,
    steps: int = 25,
    guidance: Sequence[float] = (4.0,),
    device: str = "auto",
    weights_dir: str | os.PathLike | None = None,
    out_json: str | os.PathLike | None = None,
    grid: str | os.PathLike | None = None,
    gif: str | os.PathLike | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    console: Any = None,
) -> list[dict[str, Any]]:
    """Generate, judge and compare (see module docstring); returns one row per guidance scale."""
    from rich.console import Console

    from ..models.judge import frechet_distance, judge_accuracy, load_judge, per_class_accuracy
    from ..models.reference import load_reference
    from ..sampler import generate

    console = console or Console(soft_wrap=True)
    if samples < 2:
        raise DiffspeedError(f"--samples must be at least 2 (Frechet distance needs 2 per set), got {samples}")
    if not guidance:
        raise DiffspeedError("give at least one --guidance value")
    dev = resolve_device(device)
    configure_backends(dev)
    loaded = load_reference(model, device=dev, dtype=torch.float32, weights_dir=weights_dir)
    judge = load_judge(loaded.judge, device=dev, weights_dir=weights_dir)
    data = clips if loaded.is_video else shapes
    num_classes = loaded.num_classes or 1
    if batch_size is None:
        batch_size = (128 if loaded.is_video else 500) if dev.type == "cuda" else (8 if loaded.is_video else 64)

    # real reference sets: 2 x samples held-out samples, split in two disjoint halves
    real, real_labels = data.make_dataset(2 * samples, device=dev)
    real_pix = (real + 1) / 2
    feats_real = judge.features(real_pix)
    real_a, real_b = feats_real[:samples], feats_real[samples:]
    fd_real = frechet_distance(real_a, real_b)
    acc_real = judge_accuracy(judge, real_pix, real_labels.cpu())
    motion_real = motion_energy(real_pix) if loaded.is_video else None
    del real, real_pix
    console.print(f"[eval {model}] judge accuracy on {2 * samples} held-out real samples {acc_real:.4f}; "
                  f"Frechet judge distance real vs real {fd_real:.4f}", highlight=False, markup=False)

    labels = [i % num_classes for i in range(samples)]
    seeds = [seed * 1_000_003 + i for i in range(samples)]
    rows = []
    for gi, g in enumerate(guidance):
        t0 = time.monotonic()
        chunks = []
        for start in range(0, samples, batch_size):
            pix = generate(loaded, labels[start:start + batch_size], seeds[start:start + batch_size],
                           num_steps=steps, guidance_scale=float(g), cfg_mode="batched")
            chunks.append(pix.float())
        gen_pix = torch.cat(chunks)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.monotonic() - t0
        acc = judge_accuracy(judge, gen_pix, labels)
        fd = frechet_distance(judge.features(gen_pix), real_a)
        row: dict[str, Any] = {
            "model": model,
            "judge": loaded.judge,
            "judge_accuracy": acc,
            "frechet_judge": fd,
            "frechet_real_vs_real": fd_real,
            "judge_accuracy_real": acc_real,
            "steps": steps,
            "guidance_scale": float(g),
            "num_samples": samples,
            "device": device_name(dev),
            "sampler": "flow-matching Euler" + (", batched CFG" if float(g) > 1.0 else ", no CFG"),
            "sampling_seconds": round(seconds, 3),
            "per_class_accuracy": per_class_accuracy(judge, gen_pix, labels),
            "seed": seed,
        }
        if loaded.is_video:
            row["motion_generated"] = motion_energy(gen_pix)
            row["motion_real"] = motion_real
        rows.append(row)
        extra = f", motion {row['motion_generated']:.4f} (real {motion_real:.4f})" if loaded.is_video else ""
        console.print(f"[eval {model}] guidance {g}: judge accuracy {acc:.4f}, Frechet judge {fd:.4f} "
                      f"(real vs real {fd_real:.4f}){extra}; {samples} samples x {steps} steps in {seconds:.1f}s",
                      highlight=False, markup=False)
        if gi == 0 and grid is not None:
            per_row = 10 if not loaded.is_video else 1
            label_t = torch.tensor(labels)
            grid_rows = []
            for c in range(num_classes):
                idx = (label_t == c).nonzero()[:per_row, 0]
                if loaded.is_video:
                    # one clip per class: its 16 frames side by side
                    grid_rows.append(gen_pix[idx[0]].transpose(0, 1).cpu() if len(idx) else torch.ones(1, 3, 32, 32))
                else:
                    grid_rows.append(gen_pix[idx].cpu() if len(idx) else torch.ones(1, 3, 32, 32))
            title = f"{model}: {steps} Euler steps, guidance {g}, judge accuracy {acc:.3f}"
            save_labelled_grid(grid_rows, loaded.class_names or [str(c) for c in range(num_classes)], grid, title,
                               xlabel="frames 0-15 of one clip per class" if loaded.is_video else None)
            console.print(f"[eval {model}] wrote {grid}", highlight=False, markup=False)
            if loaded.is_video:
                gif_path = Path(gif) if gif is not None else Path(grid).with_suffix(".gif")
                first = [int((torch.tensor(labels) == c).nonzero()[0, 0]) for c in range(num_classes) if c in labels]
                save_gif(gen_pix[first].cpu(), gif_path)
                console.print(f"[eval {model}] wrote {gif_path}", highlight=False, markup=False)
        del gen_pix, chunks
    if out_json is not None:
        merge_rows(out_json, rows)
        console.print(f"[eval {model}] merged {len(rows)} row(s) into {out_json}", highlight=False, markup=False)
    return rows
