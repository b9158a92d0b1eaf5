"""Pick SmoothQuant's migration strength per model by measured fidelity, not by folklore.

``alpha`` = 0.5 is the usual default, but how far activation outliers should move into the weights
depends on the model: on ``reference-image`` (int8 W8A8 with static scales, 25 steps, CPU;
``benchmarks/results/smooth_alpha_cpu.json``) PSNR was 39.24 dB without smoothing, 40.81 dB at
alpha 0.5 and 43.64 dB at 0.65 (0.8: 40.83). :func:`search_smooth_alpha`
quantizes a copy of the transformer for each candidate (and for no smoothing), samples a few
calibration seeds, and returns the candidate whose output is closest to the unquantized model's.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Sequence

import torch

from ..errors import DiffspeedError

DEFAULT_ALPHAS: tuple[float, ...] = (0.3, 0.5, 0.65, 0.8)


@torch.no_grad()
def search_smooth_alpha(loaded: Any, config: Any, *, stats: Any = None, alphas: Sequence[float] = DEFAULT_ALPHAS,
                        seeds: Sequence[int] = (9000, 9001, 9002, 9003), labels: Sequence[int] | None = None,
                        steps: int = 10, guidance: float = 4.0) -> tuple[float | None, dict[str, float]]:
    """(best alpha or None for no smoothing, {candidate: PSNR dB vs the unquantized output}).

    ``loaded`` is a :class:`~diffspeed.models.bundle.LoadedModel` (left unchanged); ``config`` a
    :class:`~diffspeed.methods.ptq.PTQConfig` of a w8a8 format with ``calibration`` set (its
    ``smooth_alpha`` is ignored); ``stats`` the loaded :class:`ActivationStats`, if at hand.
    """
    from ..bench.metrics import psnr
    from ..methods.ptq import ptq_model_
    from ..quant.formats import W8A8_FORMATS
    from ..sampler import generate

    if config.format not in W8A8_FORMATS or config.calibration is None:
        raise DiffspeedError("the SmoothQuant alpha search needs a w8a8 format and activation stats (calibration)")
    if not alphas or any(not 0.0 <= float(a) <= 1.0 for a in alphas):
        raise DiffspeedError(f"alphas must be a non-empty list of numbers in [0, 1], got {list(alphas)}")
    n_cls = len(loaded.class_names) if loaded.class_names else 1
    labels = list(labels) if labels is not None else [i % n_cls for i in range(len(seeds))]
    kw = dict(num_steps=steps, guidance_scale=guidance)
    reference = generate(loaded, labels, list(seeds), **kw)
    results: dict[str, float] = {}
    best: tuple[float, float | None] | None = None
    for alpha in [None, *alphas]:
        trial = copy.copy(loaded)
        trial.transformer = copy.deepcopy(loaded.transformer)
        ptq_model_(trial.transformer, dataclasses.replace(config, smooth_alpha=alpha), stats=stats)
        score = float(psnr(generate(trial, labels, list(seeds), **kw), reference))
        results["none" if alpha is None else str(alpha)] = score
        if best is None or score > best[0]:
            best = (score, alpha)
        del trial
    assert best is not None
    return best[1], results


__all__ = ["DEFAULT_ALPHAS", "search_smooth_alpha"]
