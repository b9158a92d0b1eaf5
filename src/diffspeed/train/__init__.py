"""Training and evaluation of the shipped reference models and their judges.

* :mod:`.image` / :mod:`.video`: rectified-flow training of ``reference-image`` (DiT) and
  ``reference-video`` (Wan) on the procedural data of :mod:`diffspeed.data`;
* :mod:`.judge`: the judge classifiers;
* :mod:`.evaluate`: sampler + judge: class accuracy, Frechet judge distance, grids, GIFs;
* :mod:`.common`: the shared loop (AdamW, warmup + cosine on a step/time budget, EMA, bf16
  autocast on CUDA, grad clipping, loss curves);
* :mod:`.cli`: the ``diffspeed train`` typer app (``python -m diffspeed.train.cli``).

Submodules import torch/diffusers lazily, so importing this package is cheap.
"""
