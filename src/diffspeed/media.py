"""Writing images and videos: grids as PNG, clips as GIF (or MP4 with imageio-ffmpeg).

Every write is atomic (temporary file, then rename), so a failure never leaves a partial file, and
the destination is checked before any expensive work (:func:`check_writable`).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import DiffspeedError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_SUFFIXES = (".gif", ".mp4")


def check_writable(path: str | Path, suffixes: tuple[str, ...] | None = None) -> Path:
    """Raise DiffspeedError unless ``path`` can be created (parent exists or can be made, is writable)."""
    p = Path(path)
    if suffixes is not None and p.suffix.lower() not in suffixes:
        raise DiffspeedError(f"output {str(p)!r} must end with one of {', '.join(suffixes)}")
    if p.exists() and p.is_dir():
        raise DiffspeedError(f"output path {str(p)!r} is a directory")
    check_parent_writable(p)
    return p


def check_parent_writable(p: Path) -> None:
    """Raise DiffspeedError unless ``p``'s parent directory exists (or can be made) and is writable."""
    parent = p.parent if str(p.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiffspeedError(f"cannot create the output directory {str(parent)!r}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise DiffspeedError(f"output directory {str(parent)!r} is not writable")


def _atomic_save(path: Path, save_fn) -> None:  # noqa: ANN001
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        save_fn(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(..., C, H, W) floats in [0, 1] -> (..., H, W, C) uint8."""
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return x.movedim(-3, -1).numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """(B, C, H, W) in [0, 1] -> one (H', W', 3) uint8 grid."""
    b, c, h, w = images.shape
    if c == 1:
        images = images.repeat(1, 3, 1, 1)
    if scale > 1:
        images = torch.nn.functional.interpolate(images.float(), scale_factor=scale, mode="nearest")
        h, w = h * scale, w * scale
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol = math.ceil(b / nrow)
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    arr = to_uint8(images[:, :3])
    for i in range(b):
        r, col = divmod(i, nrow)
        y, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x0 : x0 + w] = arr[i]
    return grid


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    from PIL import Image

    p = check_writable(path, IMAGE_SUFFIXES)
    grid = make_grid(images, nrow=nrow, scale=scale)
    _atomic_save(p, lambda tmp: Image.fromarray(grid).save(tmp))
    return p


def save_video(clips: torch.Tensor, path: str | Path, fps: int = 8, scale: int = 4) -> Path:
    """(B, C, F, H, W) in [0, 1] -> an animated grid (one tile per clip) as GIF or MP4."""
    p = check_writable(path, VIDEO_SUFFIXES)
    frames = [make_grid(clips[:, :, f], scale=scale) for f in range(clips.shape[2])]
    if p.suffix.lower() == ".gif":
        from PIL import Image

        pil = [Image.fromarray(f) for f in frames]
        _atomic_save(p, lambda tmp: pil[0].save(tmp, save_all=True, append_images=pil[1:], duration=int(1000 / fps), loop=0))
    else:
        try:
            import imageio.v2 as imageio
        except ImportError:
            raise DiffspeedError("writing MP4 needs `pip install imageio imageio-ffmpeg`; or use a .gif output") from None
        _atomic_save(p, lambda tmp: imageio.mimsave(tmp, frames, fps=fps))
    return p
