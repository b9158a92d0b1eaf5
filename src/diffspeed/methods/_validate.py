"""Small helpers shared by the methods: config validation and model-family lookup."""

from __future__ import annotations

import math
import re
from typing import Any

from torch import nn

from ..errors import DiffspeedError

IMAGE_CLASSES = ("DiTTransformer2DModel", "PixArtTransformer2DModel")
VIDEO_CLASSES = ("WanTransformer3DModel",)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require_int(method: str, name: str, value: Any, minimum: int, why: str = "") -> None:
    """Raise unless ``value`` is an integer >= ``minimum``; ``why`` is added in parentheses."""
    if not is_int(value) or value < minimum:
        note = f" ({why})" if why else ""
        raise DiffspeedError(f"{method} {name} must be an integer >= {minimum}{note}, got {value!r}")


def require_recompute_ratio(method: str, value: Any) -> None:
    if not is_number(value) or not 0 < value <= 1:
        raise DiffspeedError(
            f"{method} recompute_ratio must be in (0, 1] (e.g. 0.5; 1.0 recomputes every token), got {value!r}"
        )


def require_patterns(method: str, name: str, value: Any) -> None:
    """Raise unless ``value`` is a tuple of valid regexes (a config's ``include`` / ``exclude``)."""
    if isinstance(value, str) or not isinstance(value, tuple):
        raise DiffspeedError(f"{method} {name} must be a list of regexes, e.g. [\"attn\"], got {value!r}")
    for pattern in value:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as exc:
            raise DiffspeedError(f"{method} {name} pattern {pattern!r} is not a valid regex: {exc}") from None


def require_bool(method: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise DiffspeedError(f"{method} {name} must be true or false, got {value!r}")


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def grid_kind(model: nn.Module) -> str | None:
    """'image' (DiT / PixArt), 'video' (Wan) or None for the unwrapped model's class."""
    for klass in type(unwrap(model)).__mro__:
        if klass.__name__ in IMAGE_CLASSES:
            return "image"
        if klass.__name__ in VIDEO_CLASSES:
            return "video"
    return None
