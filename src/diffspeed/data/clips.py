"""Procedural class-conditional video data set: a moving, rotating shape on a static background.

Every clip is (C, F, H, W) = (3, 16, 32, 32) with values in [-1, 1] (the pixels are the latents
of the reference video model). The class fixes the shape AND the direction of its motion, so a
single frame cannot tell the class: the motion has to be seen.

Classes (``CLASS_NAMES``, 8 = 2 shapes x 4 directions; class id = shape_index * 4 + motion_index)::

    0 square-right    1 square-left    2 square-up    3 square-down
    4 triangle-right  5 triangle-left  6 triangle-up  7 triangle-down

Nuisance (random per clip): size, start position (symmetric, so position does not reveal the
direction), travel distance (9-14 px over the 16 frames), start angle and spin (both senses),
shape colour (any saturated hue) and a textured background (gradient, stripes or smooth noise in
muted colours, the generator of :mod:`diffspeed.data.shapes` with longer stripes and less
contrast).

Rendering is vectorised in torch and deterministic given the seed, like the image data.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from .shapes import (
    HELDOUT_SEED,
    _rand,
    _uniform,
    balanced_labels,
    balanced_set,
    heldout_seed,
    labelled_batch,
    make_generator,
    placed_shape_coverage,
    render_backgrounds,
    seeded_stream,
    stream_seed,
)
from .shapes import SHAPES as _IMAGE_SHAPES

FRAMES = 16
FRAME_SIZE = 32
SHAPES = ("square", "triangle")
MOTIONS = ("right", "left", "up", "down")
CLASS_NAMES: list[str] = [f"{s}-{m}" for s in SHAPES for m in MOTIONS]
NUM_CLASSES = len(CLASS_NAMES)
# unit direction (dx, dy) of each motion in image coordinates (y grows downwards)
MOTION_DIRS = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}

__all__ = [
    "CLASS_NAMES", "NUM_CLASSES", "FRAMES", "FRAME_SIZE", "SHAPES", "MOTIONS", "HELDOUT_SEED",
    "render_clips", "sample_batch", "batch_stream", "make_dataset", "class_parts",
]


def class_parts(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(shape index into SHAPES, motion index into MOTIONS) of each class id."""
    return labels // len(MOTIONS), labels % len(MOTIONS)


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Vectorised HSV -> RGB; inputs (B,), h in [0, 1); returns (B, 3)."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=1)
    f = torch.minimum(k, 4 - k).clamp(0, 1)
    return v[:, None] - v[:, None] * s[:, None] * f


def render_clips(labels: torch.Tensor, gen: torch.Generator, device: torch.device | str | None = None) -> torch.Tensor:
    """Render one clip per label: (B, 3, 16, 32, 32) in [-1, 1]; randomness from ``gen`` only."""
    device = torch.device(device) if device is not None else labels.device
    labels = labels.to(device).long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):  # a device sync: not per step
        raise ValueError(f"clip labels must be in [0, {NUM_CLASSES}), got {labels.tolist()}")
    return _render(labels, gen, device)


def _render(labels: torch.Tensor, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """:func:`render_clips` without the label check (which syncs the device); labels must be valid."""
    batch, size, frames = labels.shape[0], FRAME_SIZE, FRAMES
    shape_idx, motion_idx = class_parts(labels)
    # map onto the SDF ids of the image module
    sdf_ids = torch.tensor([_IMAGE_SHAPES.index(s) for s in SHAPES], device=device)[shape_idx]
    dirs = torch.tensor([MOTION_DIRS[m] for m in MOTIONS], device=device)[motion_idx]  # (B, 2)

    # static over time; slightly calmer than the image backgrounds (longer stripes, less contrast)
    bg = render_backgrounds(gen, batch, size, device, stripe_period=(8.0, 16.0), contrast=(0.06, 0.28))

    r = _uniform(gen, 5.0, 7.0, batch, device=device)
    margin = 1.2 * r + 1.0
    room = size - 2 * margin
    travel = torch.minimum(_uniform(gen, 9.0, 14.0, batch, device=device), room)
    # centre of the path: along the motion axis leave room for the travel; across it, anywhere
    along = margin + travel / 2 + (room - travel) * _rand(gen, batch, device=device)
    across = margin + room * _rand(gen, batch, device=device)
    horizontal = dirs[:, 0] != 0
    mid_x = torch.where(horizontal, along, across)
    mid_y = torch.where(horizontal, across, along)
    t = torch.linspace(-0.5, 0.5, frames, device=device)  # (F,)
    cx = mid_x[:, None] + dirs[:, 0:1] * travel[:, None] * t  # (B, F)
    cy = mid_y[:, None] + dirs[:, 1:2] * travel[:, None] * t
    spin = _uniform(gen, 0.06, 0.20, batch, device=device)
    spin = spin * torch.where(_rand(gen, batch, device=device) < 0.5, -1.0, 1.0)
    theta0 = _uniform(gen, 0, 2 * math.pi, batch, device=device)
    theta = theta0[:, None] + spin[:, None] * torch.arange(frames, device=device)  # (B, F)

    alpha, _, _ = placed_shape_coverage(sdf_ids, r, cx, cy, theta, size, device)  # (B, 1, F, H, W)

    hue = _rand(gen, batch, device=device)
    sat = _uniform(gen, 0.65, 0.95, batch, device=device)
    val = _uniform(gen, 0.75, 1.0, batch, device=device)
    fg = _hsv_to_rgb(hue, sat, val)[:, :, None, None, None]  # (B, 3, 1, 1, 1)
    clip = bg[:, :, None] * (1 - alpha) + fg * alpha
    return clip.clamp(0, 1) * 2 - 1


def sample_batch(batch_size: int, seed: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch (clips in [-1, 1], labels), a pure function of ``seed``."""
    # valid by construction: skip render_clips' label check, a GPU->CPU sync every training step
    return labelled_batch(batch_size, seed, device, NUM_CLASSES, _render)


def batch_stream(batch_size: int, seed: int = 0, device: torch.device | str = "cpu",
                 start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless stream of training batches; batch i is ``sample_batch(.., stream_seed(seed, i))``."""
    return seeded_stream(sample_batch, batch_size, seed, device, start)


def make_dataset(n: int, seed: int = HELDOUT_SEED, device: torch.device | str = "cpu",
                 chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, class-balanced set of ``n`` clips (default: the held-out set), deterministic."""
    return balanced_set(n, seed, device, chunk, NUM_CLASSES, render_clips, (3, FRAMES, FRAME_SIZE, FRAME_SIZE))
