"""Procedural class-conditional image data set: coloured shapes on textured backgrounds.

Every image is 3 x 32 x 32 with values in [-1, 1] (the pixels are the latents of the reference
image model). The class fixes the shape AND its colour; everything else is random nuisance:
position, size, rotation, colour jitter, shading and a textured background (linear gradient,
stripes of random angle/period, or smooth value noise) in muted, low-saturation colours, plus a
little per-pixel grain.

Classes (``CLASS_NAMES``, 12 = 4 shapes x 3 colours; class id = shape_index * 3 + colour_index)::

    0 red-circle     1 green-circle     2 blue-circle
    3 red-square     4 green-square     5 blue-square
    6 red-triangle   7 green-triangle   8 blue-triangle
    9 red-cross     10 green-cross     11 blue-cross

Rendering is fully vectorised in torch (signed distances on a pixel grid, anti-aliased edges), so
a batch of thousands renders in milliseconds on CPU or GPU. Everything is deterministic: a batch
depends only on its integer seed (and the device kind: CPU and CUDA generators differ). Training
draws batch ``i`` of stream ``seed`` from :func:`stream_seed`; the held-out set comes from a
disjoint seed range (:data:`HELDOUT_SEED`).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue")
CLASS_NAMES: list[str] = [f"{c}-{s}" for s in SHAPES for c in COLOURS]
NUM_CLASSES = len(CLASS_NAMES)

# saturated base colours of the shapes (RGB in [0, 1]); backgrounds are muted (low saturation)
COLOUR_RGB = {
    "red": (0.88, 0.14, 0.12),
    "green": (0.12, 0.78, 0.20),
    "blue": (0.14, 0.32, 0.95),
}

HELDOUT_SEED = 7_777_777
_STREAM_STRIDE = 1 << 24  # batches per training stream before seeds of two streams could overlap
_HELDOUT_BASE = 1 << 52  # held-out seeds live far above every training stream seed


def stream_seed(seed: int, index: int) -> int:
    """Seed of batch ``index`` of training stream ``seed`` (disjoint from the held-out range)."""
    return (int(seed) % (1 << 27)) * _STREAM_STRIDE + int(index) % _STREAM_STRIDE


def heldout_seed(seed: int, chunk: int) -> int:
    return _HELDOUT_BASE + (int(seed) % (1 << 27)) * _STREAM_STRIDE + int(chunk)


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    device = torch.device(device)
    gen = torch.Generator(device=device if device.type == "cuda" else "cpu")
    gen.manual_seed(int(seed))
    return gen


def _rand(gen: torch.Generator, *shape: int, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=gen.device).to(device)


def _uniform(gen: torch.Generator, lo: float, hi: float, *shape: int, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * _rand(gen, *shape, device=device)


def pixel_grid(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x) pixel-centre coordinates, each (size, size), in pixels."""
    coords = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    return torch.meshgrid(coords, coords, indexing="ij")


# ---- signed distances (negative inside), in pixels ---------------------------------------------

def _sd_box(x: torch.Tensor, y: torch.Tensor, bx: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
    qx = x.abs() - bx
    qy = y.abs() - by
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    inside = torch.maximum(qx, qy).clamp(max=0)
    return outside + inside


def shape_sdf(shape_id: torch.Tensor, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance of shape ``shape_id`` (index into SHAPES) of size ``r``.

    ``x``, ``y`` are coordinates already centred on the shape and rotated into its frame; all
    arguments broadcast together. The size ``r`` is the circle radius; the other shapes are scaled
    to similar areas and all fit in a disc of radius 1.2 r.
    """
    circle = torch.sqrt(x * x + y * y) - r
    square = _sd_box(x, y, 0.85 * r, 0.85 * r)
    # equilateral triangle, circumradius 1.2 r (inradius 0.6 r): max over three half-planes
    tri = None
    for k in range(3):
        a = math.pi / 2 + k * 2 * math.pi / 3
        d = x * math.cos(a) + y * math.sin(a)
        tri = d if tri is None else torch.maximum(tri, d)
    tri = tri - 0.6 * r
    cross = torch.minimum(_sd_box(x, y, 1.0 * r, 0.36 * r), _sd_box(x, y, 0.36 * r, 1.0 * r))
    out = torch.where(shape_id == 0, circle, square)
    out = torch.where(shape_id == 2, tri, out)
    out = torch.where(shape_id == 3, cross, out)
    return out


def coverage(sdf: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] from a signed distance in pixels."""
    return (0.5 - sdf).clamp(0.0, 1.0)


def placed_shape_coverage(shape_id: torch.Tensor, r: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
                          theta: torch.Tensor, size: int, device: torch.device
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coverage of shape ``shape_id`` (B,) of size ``r`` (B,) centred at (``cx``, ``cy``) and rotated by
    ``theta`` on a ``size`` x ``size`` pixel grid.

    ``cx``, ``cy``, ``theta`` are (B,) for images or (B, F) for clips (one pose per frame). Returns
    ``(alpha, dx, dy)``: alpha (B, 1, ..., H, W), and the pixel offsets from the centre (B, ..., H, W).
    """
    yy, xx = pixel_grid(size, device)
    dx = xx - cx[..., None, None]
    dy = yy - cy[..., None, None]
    cos, sin = torch.cos(theta)[..., None, None], torch.sin(theta)[..., None, None]
    lx = cos * dx + sin * dy
    ly = -sin * dx + cos * dy
    per_sample = (slice(None),) + (None,) * (cx.dim() + 1)  # (B,) -> (B, 1, ..., 1) against (B, ..., H, W)
    sdf = shape_sdf(shape_id[per_sample], lx, ly, r[per_sample])
    return coverage(sdf)[:, None], dx, dy


# ---- backgrounds -------------------------------------------------------------------------------

def _muted_colours(gen: torch.Generator, batch: int, device: torch.device,
                   contrast_range: tuple[float, float] = (0.08, 0.35)) -> tuple[torch.Tensor, torch.Tensor]:
    """Two low-saturation colours per sample, (B, 3, 1, 1) each, with some brightness contrast."""
    grey1 = _uniform(gen, 0.22, 0.78, batch, 1, device=device)
    contrast = _uniform(gen, *contrast_range, batch, 1, device=device)
    sign = torch.where(_rand(gen, batch, 1, device=device) < 0.5, -1.0, 1.0)
    grey2 = (grey1 + sign * contrast).clamp(0.12, 0.88)
    tint1 = _uniform(gen, -0.10, 0.10, batch, 3, device=device)
    tint2 = _uniform(gen, -0.10, 0.10, batch, 3, device=device)
    c1 = (grey1 + tint1).clamp(0, 1)
    c2 = (grey2 + tint2).clamp(0, 1)
    return c1[:, :, None, None], c2[:, :, None, None]


def render_backgrounds(gen: torch.Generator, batch: int, size: int, device: torch.device,
                       stripe_period: tuple[float, float] = (6.0, 14.0),
                       contrast: tuple[float, float] = (0.08, 0.35)) -> torch.Tensor:
    """(B, 3, size, size) textured backgrounds in [0, 1]: gradient, stripes or smooth noise."""
    yy, xx = pixel_grid(size, device)
    c1, c2 = _muted_colours(gen, batch, device, contrast)
    kind = (_rand(gen, batch, device=device) * 3).long().clamp(max=2)
    angle = _uniform(gen, 0, 2 * math.pi, batch, device=device)[:, None, None]
    u = (xx - size / 2) * torch.cos(angle) + (yy - size / 2) * torch.sin(angle)  # (B, H, W)
    # gradient across the image
    grad = (u / size + 0.5).clamp(0, 1)
    # stripes with a period of 6..14 px (images) or 8..16 px (clips)
    period = _uniform(gen, *stripe_period, batch, device=device)[:, None, None]
    phase = _uniform(gen, 0, 2 * math.pi, batch, device=device)[:, None, None]
    stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * u / period + phase)
    # smooth value noise: a coarse random grid upsampled bicubically
    coarse = _rand(gen, batch, 1, 5, 5, device=device)
    noise = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)[:, 0].clamp(0, 1)
    mix = torch.where(kind[:, None, None] == 0, grad, stripes)
    mix = torch.where(kind[:, None, None] == 2, noise, mix)
    return c1 + (c2 - c1) * mix[:, None]


# ---- images --------------------------------------------------------------------------------------

def class_parts(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(shape index, colour index) of each class id."""
    return labels // len(COLOURS), labels % len(COLOURS)


def render_images(labels: torch.Tensor, gen: torch.Generator, device: torch.device | str | None = None) -> torch.Tensor:
    """Render one image per label: (B, 3, 32, 32) in [-1, 1]; randomness from ``gen`` only."""
    device = torch.device(device) if device is not None else labels.device
    labels = labels.to(device).long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"image labels must be in [0, {NUM_CLASSES}), got {labels.tolist()}")
    batch, size = labels.shape[0], IMAGE_SIZE
    shape_id, colour_id = class_parts(labels)
    bg = render_backgrounds(gen, batch, size, device)

    r = _uniform(gen, 5.5, 10.0, batch, device=device)
    extent = 1.2 * r + 1.0
    cx = extent + (size - 2 * extent) * _rand(gen, batch, device=device)
    cy = extent + (size - 2 * extent) * _rand(gen, batch, device=device)
    theta = _uniform(gen, 0, 2 * math.pi, batch, device=device)
    alpha, dx, dy = placed_shape_coverage(shape_id, r, cx, cy, theta, size, device)  # alpha (B, 1, H, W)

    base = torch.tensor([COLOUR_RGB[c] for c in COLOURS], device=device)[colour_id]  # (B, 3)
    base = (base * _uniform(gen, 0.82, 1.08, batch, 1, device=device)
            + _uniform(gen, -0.06, 0.06, batch, 3, device=device)).clamp(0, 1)
    # mild directional shading across the shape
    shade_dir = _uniform(gen, 0, 2 * math.pi, batch, device=device)[:, None, None]
    shade = 1.0 + 0.12 * (torch.cos(shade_dir) * dx + torch.sin(shade_dir) * dy) / r[:, None, None]
    fg = (base[:, :, None, None] * shade[:, None]).clamp(0, 1)

    img = bg * (1 - alpha) + fg * alpha
    grain = 0.02 * torch.randn((batch, 1, size, size), generator=gen, device=gen.device).to(device)
    img = (img + grain).clamp(0, 1)
    return img * 2 - 1


def balanced_labels(n: int, gen: torch.Generator | None = None, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """n labels with every class equally often (up to n % C), shuffled by ``gen`` when given."""
    labels = torch.arange(n) % num_classes
    if gen is not None:
        perm = torch.randperm(n, generator=gen, device=gen.device).cpu()
        labels = labels[perm]
    return labels


def sample_batch(batch_size: int, seed: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch (images in [-1, 1], labels), a pure function of ``seed``."""
    return labelled_batch(batch_size, seed, device, NUM_CLASSES, render_images)


def batch_stream(batch_size: int, seed: int = 0, device: torch.device | str = "cpu",
                 start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless stream of training batches; batch i is ``sample_batch(.., stream_seed(seed, i))``."""
    return seeded_stream(sample_batch, batch_size, seed, device, start)


def make_dataset(n: int, seed: int = HELDOUT_SEED, device: torch.device | str = "cpu",
                 chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, class-balanced set of ``n`` images (default: the held-out set), deterministic."""
    return balanced_set(n, seed, device, chunk, NUM_CLASSES, render_images, (3, IMAGE_SIZE, IMAGE_SIZE))


# ---- batches, streams and fixed sets of any renderer (shared with :mod:`diffspeed.data.clips`) ----

Renderer = Callable[[torch.Tensor, torch.Generator, torch.device], torch.Tensor]


def labelled_batch(batch_size: int, seed: int, device: torch.device | str, num_classes: int,
                   render: Renderer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(render(labels, gen, device), labels)``: uniform labels, then the samples, all from the
    generator of ``seed``."""
    device = torch.device(device)
    gen = make_generator(seed, device)
    labels = torch.randint(0, num_classes, (batch_size,), generator=gen, device=gen.device).to(device)
    return render(labels, gen, device), labels


def seeded_stream(sample: Callable[[int, int, torch.device | str], tuple[torch.Tensor, torch.Tensor]],
                  batch_size: int, seed: int, device: torch.device | str,
                  start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``sample(batch_size, stream_seed(seed, i), device)`` for i = start, start + 1, ..."""
    i = start
    while True:
        yield sample(batch_size, stream_seed(seed, i), device)
        i += 1


def balanced_set(n: int, seed: int, device: torch.device | str, chunk: int, num_classes: int,
                 render: Renderer, item_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` class-balanced samples of held-out seed ``seed``, rendered ``chunk`` at a time (each chunk
    from its own generator), and their labels; ``item_shape`` is one sample's shape (for ``n == 0``)."""
    device = torch.device(device)
    labels = balanced_labels(n, make_generator(heldout_seed(seed, 1 << 23), "cpu"), num_classes)
    parts = []
    for k, start in enumerate(range(0, n, chunk)):
        gen = make_generator(heldout_seed(seed, k), device)
        parts.append(render(labels[start:start + chunk].to(device), gen, device))
    if not parts:
        return torch.empty(0, *item_shape, device=device), labels.to(device)
    return torch.cat(parts), labels.to(device)
