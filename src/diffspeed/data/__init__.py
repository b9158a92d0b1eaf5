"""Procedural, seeded data sets for the shipped reference models.

* :mod:`diffspeed.data.shapes`: 12-class images (shape x colour) on textured backgrounds,
  (3, 32, 32) in [-1, 1].
* :mod:`diffspeed.data.clips`: 8-class 16-frame clips (shape x motion direction),
  (3, 16, 32, 32) in [-1, 1].

Both render vectorised in torch on any device and are deterministic given a seed; training data
is generated on the fly per batch, and a fixed held-out set comes from a disjoint seed range.
"""

from __future__ import annotations

from . import clips, shapes

IMAGE_CLASS_NAMES = shapes.CLASS_NAMES
VIDEO_CLASS_NAMES = clips.CLASS_NAMES


def get_dataset_module(kind: str):
    """``"image"`` -> :mod:`shapes`, ``"video"`` -> :mod:`clips`."""
    if kind == "image":
        return shapes
    if kind == "video":
        return clips
    raise ValueError(f"unknown data kind {kind!r}; expected 'image' or 'video'")


__all__ = ["shapes", "clips", "IMAGE_CLASS_NAMES", "VIDEO_CLASS_NAMES", "get_dataset_module"]
