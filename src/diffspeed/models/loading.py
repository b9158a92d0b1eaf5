"""Resolve a model name or path to a :class:`~diffspeed.models.bundle.LoadedModel`.

:func:`load_model` accepts, in this order:

1. a zoo name (:func:`diffspeed.models.zoo.zoo_names`): random-weight models built offline;
2. ``reference-*``: shipped trained reference models (:mod:`diffspeed.models.reference`);
3. a local directory: a transformer saved with ``save_pretrained`` (``config.json`` whose
   ``_class_name`` is a diffusers transformer class), or a pipeline directory with a
   ``transformer/`` subfolder;
4. a Hugging Face hub id (``org/name``): ``<Class>.from_pretrained(id, subfolder="transformer")``,
   the class read from the hub config. ``HF_HUB_OFFLINE=1`` (read at call time) restricts this to
   the local hub cache.

For (3) and (4) only the transformer is loaded: the :class:`LoadedModel`'s ``make_condition`` gives
the adapter's *random* dummy condition (deterministic per label), which is right for speed
benchmarks only. Real text conditioning comes from the user's own diffusers pipeline: attach
diffspeed methods to ``pipe.transformer`` and let the pipeline encode prompts.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..adapters import get_adapter, registered_model_classes
from ..errors import DiffspeedError, UnsupportedModelError
from .bundle import Conditioning, LoadedModel
from .zoo import build_model, class_condition_fn, latents_to_pixels, zoo_names

# legacy class names whose from_pretrained remaps to a supported class (DiT / PixArt hub checkpoints)
_REMAPPED_CLASSES = {"Transformer2DModel"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _reference_names() -> list[str]:
    try:
        from . import reference  # noqa: PLC0415  (written separately; optional)
    except ImportError:
        return []
    for attr in ("reference_names", "list_references"):
        fn = getattr(reference, attr, None)
        if callable(fn):
            try:
                return list(fn())
            except Exception:  # a listing problem must not hide the real error
                return []
    return []


def known_names() -> list[str]:
    return zoo_names() + _reference_names()


def _known_line() -> str:
    refs = _reference_names()
    names = zoo_names() + (refs if refs else ["reference-<name>"])
    return (
        f"known names: {', '.join(names)}; or a local diffusers model/pipeline directory, "
        "or a Hugging Face hub id (org/name)"
    )


def _hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _diffusers_class(class_name: str, where: str) -> type[nn.Module]:
    import diffusers

    if class_name not in registered_model_classes() and class_name not in _REMAPPED_CLASSES:
        raise UnsupportedModelError(
            f"{where}: model class {class_name!r} has no diffspeed adapter; supported: "
            f"{', '.join(registered_model_classes())}"
        )
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise DiffspeedError(f"{where}: {class_name!r} is not a model class of the installed diffusers")
    return cls


def _wrap(name: str, model: nn.Module, source: str) -> LoadedModel:
    """A LoadedModel around a bare transformer, conditioned with the adapter's dummy condition."""
    model.eval()
    adapter = get_adapter(model)
    latent_shape = tuple(adapter.default_latent_shape(model))

    if hasattr(adapter, "null_class"):  # class-conditional (DiT): labels are the class indices
        num_classes = adapter.null_class(model)
        return LoadedModel(
            name=name, transformer=model, adapter=adapter, latent_shape=latent_shape,
            make_condition=class_condition_fn(num_classes), to_pixels=latents_to_pixels,
            class_names=[f"class {i}" for i in range(num_classes)], extras={"source": source},
        )

    def make_condition(labels: Sequence[int], device: torch.device) -> Conditioning:
        if len(labels) == 0:
            raise DiffspeedError("at least one label is needed")
        conds, unconds = [], []
        for label in labels:  # one seeded draw per label: a sample is the same in any batch
            gen = torch.Generator().manual_seed(int(label) % (2**63))
            cond, uncond = adapter.dummy_condition(model, 1, gen)
            conds.append(cond)
            unconds.append(uncond)
        return Conditioning(_stack(conds, device), _stack(unconds, device))

    return LoadedModel(
        name=name,
        transformer=model,
        adapter=adapter,
        latent_shape=latent_shape,
        make_condition=make_condition,
        to_pixels=latents_to_pixels,
        is_video=len(latent_shape) == 4,
        extras={"source": source, "dummy_condition": True},
    )


def _stack(rows: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    out = {}
    for key, first in rows[0].items():
        if isinstance(first, torch.Tensor):
            out[key] = torch.cat([r[key] for r in rows]).to(device)
        else:
            out[key] = first
    return out


@torch.no_grad()
def _own_storage_(model: nn.Module) -> nn.Module:
    """Copy CPU tensors that still view the loaded file into fresh, aligned memory.

    ``from_pretrained`` can leave CPU parameters as views of the memory-mapped safetensors file at
    unaligned offsets; BLAS then takes other code paths and results differ in the last bit from the
    same weights in ordinary memory (and the file stays mapped). One tensor at a time, so the peak
    extra memory is one tensor.
    """
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, tensor in store.items():
                if tensor is not None and tensor.device.type == "cpu" and tensor.data_ptr() % 64:
                    tensor.data = tensor.data.clone()
    return model


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DiffspeedError(f"cannot read {path}: {exc}") from exc


def _load_local(path: Path, *, device: str | torch.device, dtype: torch.dtype) -> LoadedModel:
    folder = path
    if not (folder / "config.json").is_file() and (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise DiffspeedError(
            f"{path} has neither a config.json nor a transformer/config.json; save a transformer with "
            "save_pretrained or point to a diffusers pipeline directory"
        )
    class_name = _read_json(config_file).get("_class_name")
    if not class_name:
        raise DiffspeedError(f"{config_file} has no _class_name; it is not a diffusers model config")
    cls = _diffusers_class(class_name, str(config_file))
    try:
        model = cls.from_pretrained(str(folder), torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise DiffspeedError(f"could not load {class_name} from {folder}: {exc}") from exc
    return _wrap(str(path), _own_storage_(model.to(device)), "local")


def _load_hub(repo_id: str, *, device: str | torch.device, dtype: torch.dtype) -> LoadedModel:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - diffusers depends on it
        raise DiffspeedError("loading from the hub needs huggingface_hub") from exc
    offline = _hub_offline()
    config_path = None
    subfolder: str | None = None
    errors = []
    for candidate in ("transformer", None):
        try:
            config_path = hf_hub_download(
                repo_id, "config.json", subfolder=candidate, local_files_only=offline
            )
            subfolder = candidate
            break
        except Exception as exc:  # noqa: BLE001 - any hub/network failure means "not found"
            errors.append(f"{type(exc).__name__}")
    if config_path is None:
        mode = " (HF_HUB_OFFLINE is set: only the local cache was searched)" if offline else ""
        raise DiffspeedError(
            f"model {repo_id!r} could not be found locally or on the Hugging Face hub{mode} "
            f"[{', '.join(errors)}]; {_known_line()}"
        )
    class_name = _read_json(Path(config_path)).get("_class_name")
    if not class_name:
        raise DiffspeedError(f"hub model {repo_id!r}: config.json has no _class_name")
    cls = _diffusers_class(class_name, f"hub model {repo_id!r}")
    try:
        model = cls.from_pretrained(repo_id, subfolder=subfolder, torch_dtype=dtype, local_files_only=offline)
    except Exception as exc:  # noqa: BLE001
        raise DiffspeedError(f"could not load hub model {repo_id!r} ({class_name}): {exc}") from exc
    return _wrap(repo_id, _own_storage_(model.to(device)), "hub")


def load_model(name_or_path: str | os.PathLike, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a zoo model, a reference model, a local diffusers directory or a hub id (see module doc)."""
    name = os.fspath(name_or_path)
    if not name:
        raise DiffspeedError(f"empty model name; {_known_line()}")
    if name in zoo_names():
        return build_model(name, device=device, dtype=dtype)
    if name.startswith("reference-"):
        try:
            from .reference import load_reference
        except ImportError as exc:
            raise DiffspeedError(f"reference model {name!r} is not available: {exc}") from exc
        return load_reference(name, device=device, dtype=dtype)
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_local(path, device=device, dtype=dtype)
    if path.exists():
        raise DiffspeedError(f"{name} is a file; give the directory that holds config.json")
    if _HUB_ID.match(name):  # org/name with no leading ".", "/" or "~": not an existing path
        return _load_hub(name, device=device, dtype=dtype)
    if "/" in name or os.sep in name:
        raise DiffspeedError(f"no such model directory: {name}; {_known_line()}")
    raise DiffspeedError(f"unknown model {name!r}; {_known_line()}")
