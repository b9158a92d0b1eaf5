"""A loaded model with everything the sampler, CLI and bench need to drive it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..adapters.base import ModelAdapter


@dataclass
class Conditioning:
    """Model keyword arguments for the conditional and (optional) unconditional branch.

    Tensors are batch-first with one row per sample; the sampler concatenates ``uncond`` and ``cond``
    along the batch for batched classifier-free guidance.
    """

    cond: dict[str, Any]
    uncond: dict[str, Any] | None = None


@dataclass
class LoadedModel:
    """A transformer plus how to condition it and how to turn its latents into pixels."""

    name: str
    transformer: nn.Module
    adapter: ModelAdapter
    latent_shape: tuple[int, ...]  # per sample: (C, H, W) or (C, F, H, W)
    # labels (one int per sample) -> Conditioning; for unconditional/random models labels may be ignored
    make_condition: Callable[[Sequence[int], torch.device], Conditioning]
    # latents (B, ...) -> pixels in [0, 1]: (B, 3, H, W) or (B, 3, F, H, W)
    to_pixels: Callable[[torch.Tensor], torch.Tensor] = lambda x: ((x.clamp(-1, 1) + 1) / 2)
    class_names: list[str] | None = None
    is_video: bool = False
    # name of a shipped judge classifier, if any (adds judge_accuracy to bench rows)
    judge: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)
