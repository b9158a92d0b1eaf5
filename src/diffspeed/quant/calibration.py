"""Timestep-aware activation statistics for static w8a8 scales and SmoothQuant.

A diffusion transformer sees very different activations at the noisy first steps and the nearly
clean last ones, so one static activation scale per layer either clips early steps or wastes int8
resolution on late ones. :func:`collect_activation_stats` splits the generation into ``G`` timestep
groups (``group = step_index * G // num_steps`` from the model's StepContext, the same rule
:class:`~diffspeed.quant.formats.QuantLinear` uses at run time) and records, per linear layer and
group:

* ``chan_absmax`` ``[G, in_features]``: per-input-channel absmax (SmoothQuant factors, and the exact
  per-tensor absmax of the smoothed input ``max_j chan_absmax[g, j] / s_j``);
* ``absmax`` ``[G]``: per-tensor absmax;
* ``pctl`` ``[G]``: a high percentile (99.99 % by default) of ``|x|``, on a strided subsample of at
  most 8192 values per call so that it stays cheap (for clipping studies);
* ``calls`` ``[G]``: how many forward calls fell in the group.

Stats are saved without pickle: one safetensors file with the metadata as JSON in its header.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import DiffspeedError, WeightFileError

STATS_FORMAT_VERSION = 1
_META_KEY = "diffspeed_activation_stats"
_FIELDS = ("chan_absmax", "absmax", "pctl", "calls")
_SUBSAMPLE = 8192


@dataclass
class ActivationStats:
    """Per-layer, per-timestep-group activation statistics of one model (see the module doc)."""

    layers: dict[str, dict[str, torch.Tensor]]
    num_groups: int
    model_class: str
    in_features: dict[str, int]
    percentile: float = 99.99
    extras: dict[str, Any] = field(default_factory=dict)

    # -- derived -----------------------------------------------------------------------------------
    def chan_absmax(self, fqn: str) -> torch.Tensor:
        """Per-channel absmax over all groups (what SmoothQuant uses)."""
        return self._layer(fqn)["chan_absmax"].amax(dim=0)

    def group_absmax(self, fqn: str, smooth: torch.Tensor | None = None) -> torch.Tensor:
        """``[G]`` per-tensor absmax per group, of ``x / smooth`` when ``smooth`` is given."""
        chan = self._layer(fqn)["chan_absmax"]
        if smooth is None:
            return self._layer(fqn)["absmax"].clone()
        return (chan / smooth.float().cpu()[None, :]).amax(dim=1)

    def _layer(self, fqn: str) -> dict[str, torch.Tensor]:
        try:
            return self.layers[fqn]
        except KeyError:
            raise DiffspeedError(
                f"the calibration stats have no entry for layer {fqn!r}; recalibrate with layers=None "
                "(every linear) or including it"
            ) from None

    # -- checks ------------------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raise DiffspeedError when these stats were collected on another model class or shapes."""
        name = type(getattr(model, "_orig_mod", model)).__name__
        if self.model_class != name:
            raise DiffspeedError(f"the calibration stats are for a {self.model_class}, not a {name}; "
                                 "calibrate this model (diffspeed.quant.calibration.calibrate)")
        modules = dict(model.named_modules())
        for fqn, k in self.in_features.items():
            m = modules.get(fqn)
            have = getattr(m, "in_features", None)
            if m is None:
                raise DiffspeedError(f"the calibration stats name layer {fqn!r}, which this model does not have; "
                                     "they are for another architecture: recalibrate")
            if have != k:
                raise DiffspeedError(f"the calibration stats for {fqn!r} have {k} input channels, the model's layer "
                                     f"has {have}; they are for another model size: recalibrate")

    # -- save / load -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (tensors ``<fqn>::<field>``, metadata as JSON in the header)."""
        from safetensors.torch import save_file

        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{fqn}::{k}": v.detach().float().contiguous().cpu()
                   for fqn, d in self.layers.items() for k, v in d.items()}
        meta = {"version": STATS_FORMAT_VERSION, "num_groups": self.num_groups, "model_class": self.model_class,
                "in_features": self.in_features, "percentile": self.percentile, "extras": self.extras}
        save_file(tensors, str(out), metadata={_META_KEY: json.dumps(meta)})
        return out

    @classmethod
    def load(cls, path: str | Path) -> "ActivationStats":
        from safetensors import safe_open

        src = Path(path)
        if not src.is_file():
            raise WeightFileError(f"no calibration stats file at {src}; make one with "
                                  "diffspeed.quant.calibration.calibrate(...).save(path)")
        try:
            with safe_open(str(src), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise WeightFileError(f"{src} is not a readable safetensors file: {exc}") from None
        if _META_KEY not in header:
            raise WeightFileError(f"{src} is not a diffspeed activation stats file (no {_META_KEY} metadata)")
        try:
            meta = json.loads(header[_META_KEY])
        except json.JSONDecodeError as exc:
            raise WeightFileError(f"{src}: corrupt stats metadata: {exc.msg}") from None
        if meta.get("version") != STATS_FORMAT_VERSION:
            raise WeightFileError(f"{src}: unsupported stats format version {meta.get('version')!r}")
        g = int(meta["num_groups"])
        layers: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            fqn, _, name = key.rpartition("::")
            if name not in _FIELDS:
                raise WeightFileError(f"{src}: unexpected tensor {key!r}")
            layers.setdefault(fqn, {})[name] = value
        in_features = {k: int(v) for k, v in meta["in_features"].items()}
        for fqn, k in in_features.items():
            d = layers.get(fqn, {})
            missing = [n for n in _FIELDS if n not in d]
            if missing:
                raise WeightFileError(f"{src}: layer {fqn!r} lacks {', '.join(missing)}")
            if tuple(d["chan_absmax"].shape) != (g, k) or any(d[n].shape != (g,) for n in ("absmax", "pctl", "calls")):
                raise WeightFileError(f"{src}: layer {fqn!r} has tensors of the wrong shape for {g} groups x {k} channels")
        return cls(layers, g, str(meta["model_class"]), in_features, float(meta.get("percentile", 99.99)),
                   dict(meta.get("extras", {})))


def _group_of(ctx: Any, num_groups: int) -> int:
    if not ctx.num_steps or ctx.step_index < 0:
        raise DiffspeedError(
            "calibration needs the step index and step count of each forward: run the model through "
            "diffspeed's sampler (diffspeed.sampler.sample / generate) inside run_fn"
        )
    return min(ctx.step_index, ctx.num_steps - 1) * num_groups // ctx.num_steps


def calibrated_linears(model: nn.Module, layer_fqns: Sequence[str], who: str) -> tuple[nn.Module, dict[str, nn.Module], list[str]]:
    """``(unwrapped model, its modules by name, the fqns)`` after checking that every fqn names an
    ``nn.Linear``; the shared front of the hook-based collectors (``who`` names the caller in errors)."""
    base = getattr(model, "_orig_mod", model)
    modules = dict(base.named_modules())
    fqns = list(layer_fqns)
    if not fqns:
        raise DiffspeedError(f"{who}: no layers given")
    bad = [f for f in fqns if not isinstance(modules.get(f), nn.Linear)]
    if bad:
        raise DiffspeedError(f"{who}: {bad[0]!r} is not an nn.Linear of the model")
    return base, modules, fqns


@torch.no_grad()
def collect_activation_stats(model: nn.Module, run_fn: Callable[[], Any], layer_fqns: Sequence[str],
                             num_groups: int = 4, percentile: float = 99.99) -> ActivationStats:
    """Record input statistics of the linears ``layer_fqns`` while ``run_fn()`` generates, bucketed
    by timestep group. The hooks are removed afterwards, also when ``run_fn`` raises."""
    from ..context import get_context

    if not isinstance(num_groups, int) or num_groups < 1:
        raise DiffspeedError(f"num_groups must be a positive integer, got {num_groups!r}")
    if not 0.0 < percentile <= 100.0:
        raise DiffspeedError(f"percentile must be in (0, 100], got {percentile}")
    base, modules, fqns = calibrated_linears(model, layer_fqns, "collect_activation_stats")
    ctx = get_context(base)
    q = percentile / 100.0
    acc: dict[str, dict[str, torch.Tensor]] = {}
    for f in fqns:
        k = modules[f].in_features
        acc[f] = {"chan_absmax": torch.zeros(num_groups, k), "absmax": torch.zeros(num_groups),
                  "pctl": torch.zeros(num_groups), "calls": torch.zeros(num_groups)}

    def make_hook(fqn: str) -> Callable[..., None]:
        st = acc[fqn]

        def hook(module: nn.Module, args: tuple) -> None:
            g = _group_of(ctx, num_groups)
            x = args[0].detach()
            a = x.reshape(-1, x.shape[-1]).abs().float()
            chan = a.amax(dim=0).cpu()
            st["chan_absmax"][g] = torch.maximum(st["chan_absmax"][g], chan)
            st["absmax"][g] = max(float(st["absmax"][g]), float(chan.max()))
            flat = a.reshape(-1)
            if flat.numel() > _SUBSAMPLE:
                flat = flat[:: math.ceil(flat.numel() / _SUBSAMPLE)]
            kth = max(1, min(flat.numel(), math.ceil(q * flat.numel())))
            st["pctl"][g] = max(float(st["pctl"][g]), float(flat.kthvalue(kth).values))
            st["calls"][g] += 1

        return hook

    handles = []
    try:
        for f in fqns:
            handles.append(modules[f].register_forward_pre_hook(make_hook(f)))
        run_fn()
    finally:
        for h in handles:
            h.remove()
    first = acc[fqns[0]]["calls"]
    if first.sum() == 0:
        raise DiffspeedError("collect_activation_stats: run_fn never called the model's calibrated layers")
    empty = [g for g in range(num_groups) if first[g] == 0]
    if empty:
        raise DiffspeedError(f"timestep groups {empty} saw no forward call: use at least {num_groups} steps "
                             f"(or fewer groups than steps)")
    return ActivationStats(acc, num_groups, type(base).__name__, {f: modules[f].in_features for f in fqns}, percentile)


def calibrate(bundle_or_model: Any, *, seeds: Sequence[int], labels: Sequence[int], steps: int = 10,
              guidance: float = 3.0, num_groups: int = 4, layers: Sequence[str] | None = None,
              progress: bool = True) -> ActivationStats:
    """Run the reference sampler on a :class:`~diffspeed.models.bundle.LoadedModel` (one generation of
    all ``seeds``/``labels``) and collect timestep-group activation stats of ``layers`` (default: every
    ``nn.Linear`` of the transformer). For a bare transformer use :func:`collect_activation_stats`
    with your own ``run_fn``."""
    from ..models.bundle import LoadedModel
    from ..sampler import generate

    if not isinstance(bundle_or_model, LoadedModel):
        raise DiffspeedError(
            "calibrate needs a LoadedModel (diffspeed.models.loading.load_model); for a bare transformer call "
            "collect_activation_stats(model, run_fn, layer_fqns) with a run_fn that samples it"
        )
    if steps < num_groups:
        raise DiffspeedError(f"calibrate: steps ({steps}) must be >= num_groups ({num_groups})")
    model = bundle_or_model.transformer
    if layers is None:
        layers = [f for f, m in model.named_modules() if f and isinstance(m, nn.Linear)]

    def run() -> None:
        generate(bundle_or_model, list(labels), list(seeds), num_steps=steps, guidance_scale=guidance,
                 progress=progress)

    stats = collect_activation_stats(model, run, layers, num_groups)
    stats.extras.update({"seeds": list(seeds), "labels": list(labels), "steps": steps, "guidance": guidance})
    return stats


__all__ = ["ActivationStats", "calibrate", "collect_activation_stats"]
