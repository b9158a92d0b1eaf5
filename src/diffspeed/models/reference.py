"""The shipped, really trained reference models (tiny, class-conditional, pixel space).

===================  ==================================  ===================================
name                 model                               data (:mod:`diffspeed.data`)
===================  ==================================  ===================================
``reference-image``  diffusers ``DiTTransformer2DModel``  12 classes: shape x colour, 3x32x32
                     192 wide (3 heads x 64), 8 blocks,
                     patch 2 (256 tokens), 6.1 M params
``reference-video``  diffusers ``WanTransformer3DModel``  8 classes: shape x motion direction,
                     192 wide (3 heads x 64), 5 blocks,   3x16x32x32 (C, F, H, W)
                     ffn 768, patch (1, 4, 4)
                     (1024 tokens), 3.4 M params
===================  ==================================  ===================================

Both are rectified-flow models on pixels in [-1, 1] (``x_t = (1 - t) x_0 + t eps``, the model
predicts ``eps - x_0`` at ``timestep = t * 1000``) trained with 10 % label dropout for
classifier-free guidance. The DiT is conditioned by ``class_labels`` (null class =
``num_classes``); the Wan model by ``encoder_hidden_states`` taken from a learned table of shape
``(num_classes + 1, tokens, text_dim)`` (last row = null), shipped as
``class_embeddings.safetensors`` beside the transformer.

Weights live in ``diffspeed/weights/<name>/`` in diffusers format (``config.json`` +
``diffusion_pytorch_model.safetensors``, stored in fp16 and upcast on load) and are produced by
``diffspeed train image`` / ``diffspeed train video`` (see ``scripts/train_reference_gpu.sh``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import DiffspeedError, WeightFileError
from .bundle import Conditioning, LoadedModel

REFERENCE_NAMES = ["reference-image", "reference-video"]
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
MODEL_FILE = "diffusion_pytorch_model.safetensors"
CONFIG_FILE = "config.json"
CLASS_EMBEDDINGS_FILE = "class_embeddings.safetensors"
CLASS_EMBEDDINGS_KEY = "class_embeddings"
IMAGE_LATENT_SHAPE = (3, 32, 32)
VIDEO_LATENT_SHAPE = (3, 16, 32, 32)
VIDEO_EMBED_TOKENS = 4
VIDEO_TEXT_DIM = 64

_CLASS_NAMES = {"reference-image": "DiTTransformer2DModel", "reference-video": "WanTransformer3DModel"}
_JUDGES = {"reference-image": "judge-image", "reference-video": "judge-video"}
_TRAIN_CMD = {"reference-image": "diffspeed train image", "reference-video": "diffspeed train video"}


def reference_names() -> list[str]:
    """Names :func:`load_reference` accepts (used by ``diffspeed models``)."""
    return list(REFERENCE_NAMES)


def class_names_for(name: str) -> list[str]:
    from ..data import clips, shapes

    _check_name(name)
    return list(shapes.CLASS_NAMES if name == "reference-image" else clips.CLASS_NAMES)


# ---- configs and builders --------------------------------------------------------------------

def image_model_config(**overrides: Any) -> dict[str, Any]:
    """Constructor kwargs of the reference DiT (pass overrides for tiny test models)."""
    from ..data import shapes

    cfg: dict[str, Any] = dict(
        num_attention_heads=3,
        attention_head_dim=64,
        in_channels=3,
        out_channels=3,
        num_layers=8,
        sample_size=32,
        patch_size=2,
        num_embeds_ada_norm=shapes.NUM_CLASSES,
        norm_type="ada_norm_zero",
    )
    cfg.update(overrides)
    return cfg


def video_model_config(**overrides: Any) -> dict[str, Any]:
    """Constructor kwargs of the reference Wan transformer (pass overrides for tiny test models)."""
    cfg: dict[str, Any] = dict(
        patch_size=(1, 4, 4),
        num_attention_heads=3,
        attention_head_dim=64,
        in_channels=3,
        out_channels=3,
        text_dim=VIDEO_TEXT_DIM,
        freq_dim=256,
        ffn_dim=768,
        num_layers=5,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )
    cfg.update(overrides)
    return cfg


def disable_builtin_label_dropout(model: nn.Module) -> nn.Module:
    """Turn off diffusers' per-block random label dropout (DiT's ``LabelEmbedding``).

    Each DiT block (and the output layer) owns its own ``LabelEmbedding`` that, in ``train()`` mode,
    drops labels with p=0.1 *independently per block*; the training code drops labels itself
    (consistently for the whole model) instead. Eval mode never drops; this only matters if someone
    calls ``model.train()``.
    """
    for module in model.modules():
        if type(module).__name__ == "LabelEmbedding":
            module.dropout_prob = 0.0
    return model


def build_image_model(**overrides: Any) -> nn.Module:
    from diffusers import DiTTransformer2DModel

    return disable_builtin_label_dropout(DiTTransformer2DModel(**image_model_config(**overrides)))


def build_video_model(**overrides: Any) -> nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**video_model_config(**overrides))


# ---- weight files -----------------------------------------------------------------------------

def _check_name(name: str) -> None:
    if name not in REFERENCE_NAMES:
        raise DiffspeedError(f"unknown reference model {name!r}; choose one of: {', '.join(REFERENCE_NAMES)}")


def model_folder(name: str, weights_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding ``name``'s files: ``<weights_dir>/<name>`` (or ``weights_dir`` itself if it
    directly holds a config.json); default the package's ``weights/`` directory."""
    _check_name(name)
    root = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    if not (root / name).is_dir() and (root / CONFIG_FILE).is_file():
        return root
    return root / name


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header; WeightFileError if unreadable/truncated."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - any parse failure means a broken file
        raise WeightFileError(f"weight file {path} is corrupted or truncated ({type(exc).__name__}: {exc})") from exc


def check_tensor_shapes(path: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Compare a safetensors file's tensors with the shapes a model expects (WeightFileError on mismatch)."""
    found = safetensors_shapes(path)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise WeightFileError(f"weight file {path} lacks {len(missing)} tensor(s) the config needs, e.g. {missing[:3]}")
    if unexpected:
        raise WeightFileError(f"weight file {path} has {len(unexpected)} tensor(s) the config does not know, e.g. {unexpected[:3]}")
    for key, shape in expected.items():
        if tuple(found[key]) != tuple(shape):
            raise WeightFileError(
                f"weight file {path}: tensor {key!r} has shape {list(found[key])} but the config needs {list(shape)}"
            )


def _read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightFileError(f"config file {path} is unreadable or not JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise WeightFileError(f"config file {path} does not hold a JSON object")
    return cfg


def _expected_shapes(cls: type, config: dict[str, Any], config_path: Path) -> dict[str, tuple[int, ...]]:
    try:
        with torch.device("meta"):
            model = cls.from_config(config)
    except Exception as exc:  # noqa: BLE001
        raise WeightFileError(f"config file {config_path} does not describe a valid {cls.__name__} ({exc})") from exc
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _missing_weights_error(name: str, folder: Path, what: str) -> WeightFileError:
    return WeightFileError(
        f"reference weights for {name!r} are not trained/shipped yet: {what} in {folder}. Train them with "
        f"`{_TRAIN_CMD[name]}` (or `python -m diffspeed.train.cli {_TRAIN_CMD[name].split()[-1]}`; "
        "on a GPU: scripts/train_reference_gpu.sh), which writes that folder"
    )


# ---- labels -----------------------------------------------------------------------------------

def resolve_labels(labels: Sequence[Any], class_names: Sequence[str], model_name: str = "model") -> list[int]:
    """Class ids from ints or class-name strings; DiffspeedError listing the valid labels otherwise."""
    out = []
    n = len(class_names)
    for label in labels:
        value: int | None = None
        if isinstance(label, str):
            key = label.strip()
            if key in class_names:
                value = class_names.index(key)
            elif key.lstrip("-").isdigit():
                value = int(key)
        elif isinstance(label, torch.Tensor) and label.numel() == 1 and not label.is_floating_point():
            value = int(label.item())
        elif not isinstance(label, bool) and hasattr(label, "__index__"):
            value = int(label.__index__())
        if value is None or not 0 <= value < n:
            valid = ", ".join(f"{i}={c}" for i, c in enumerate(class_names))
            raise DiffspeedError(f"unknown class label {label!r} for {model_name}; valid labels (id or name): {valid}")
        out.append(value)
    return out


# ---- loading ----------------------------------------------------------------------------------

def load_reference(name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   weights_dir: str | os.PathLike | None = None) -> LoadedModel:
    """Load a shipped reference model as a :class:`LoadedModel` (see the module docstring).

    Raises :class:`WeightFileError` (naming the file) when the weights are missing, truncated or do
    not match the config, and :class:`DiffspeedError` for an unknown name.
    """
    import diffusers

    _check_name(name)
    folder = model_folder(name, weights_dir)
    config_path, weights_path = folder / CONFIG_FILE, folder / MODEL_FILE
    if not folder.is_dir():
        raise _missing_weights_error(name, folder.parent, f"no folder {folder.name!r}")
    for path in (config_path, weights_path):
        if not path.is_file():
            raise _missing_weights_error(name, folder, f"{path.name} is missing")
    config = _read_config(config_path)
    expected_class = _CLASS_NAMES[name]
    if config.get("_class_name") != expected_class:
        raise WeightFileError(f"config file {config_path} is for {config.get('_class_name')!r}, expected {expected_class}")
    cls = getattr(diffusers, expected_class)
    class_names = class_names_for(name)
    num_classes = len(class_names)
    if name == "reference-image" and config.get("num_embeds_ada_norm") != num_classes:
        raise WeightFileError(
            f"config file {config_path} has num_embeds_ada_norm={config.get('num_embeds_ada_norm')} but the "
            f"reference image data has {num_classes} classes"
        )
    check_tensor_shapes(weights_path, _expected_shapes(cls, config, config_path))

    table = None
    if name == "reference-video":
        emb_path = folder / CLASS_EMBEDDINGS_FILE
        if not emb_path.is_file():
            raise _missing_weights_error(name, folder, f"{CLASS_EMBEDDINGS_FILE} is missing")
        shapes_found = safetensors_shapes(emb_path)
        shape = shapes_found.get(CLASS_EMBEDDINGS_KEY)
        if shape is None or len(shape) != 3 or shape[0] != num_classes + 1 or shape[2] != config.get("text_dim"):
            raise WeightFileError(
                f"weight file {emb_path}: tensor {CLASS_EMBEDDINGS_KEY!r} has shape {shape}, expected "
                f"({num_classes + 1}, tokens, {config.get('text_dim')})"
            )
        from safetensors.torch import load_file

        try:
            table = load_file(str(emb_path))[CLASS_EMBEDDINGS_KEY]
        except Exception as exc:  # noqa: BLE001
            raise WeightFileError(f"weight file {emb_path} is corrupted ({type(exc).__name__}: {exc})") from exc

    try:
        model = cls.from_pretrained(str(folder), torch_dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - anything from_pretrained chokes on is a weight-file problem
        raise WeightFileError(f"could not load {weights_path} ({type(exc).__name__}: {exc})") from exc
    model = model.to(device).eval()
    if name == "reference-image":
        disable_builtin_label_dropout(model)
    latent_shape = IMAGE_LATENT_SHAPE if name == "reference-image" else VIDEO_LATENT_SHAPE
    model.diffspeed_latent_shape = latent_shape  # read by the adapters' default_latent_shape

    from ..adapters import get_adapter

    adapter = get_adapter(model)
    extras: dict[str, Any] = {"weights_dir": str(folder)}
    training_json = folder / "training.json"
    if training_json.is_file():
        try:
            extras["training"] = json.loads(training_json.read_text())
        except (OSError, json.JSONDecodeError):
            pass

    if name == "reference-image":
        null = num_classes

        def make_condition(labels: Sequence[Any], device: torch.device) -> Conditioning:
            ids = resolve_labels(labels, class_names, name)
            if not ids:
                raise DiffspeedError("at least one label is needed")
            cond = torch.tensor(ids, dtype=torch.long, device=device)
            return Conditioning({"class_labels": cond}, {"class_labels": torch.full_like(cond, null)})
    else:
        assert table is not None
        float_dtype = next(model.parameters()).dtype
        table = table.to(device=device, dtype=float_dtype if float_dtype.is_floating_point else torch.float32)
        extras["class_embeddings"] = table

        def make_condition(labels: Sequence[Any], device: torch.device) -> Conditioning:
            ids = resolve_labels(labels, class_names, name)
            if not ids:
                raise DiffspeedError("at least one label is needed")
            tab = table.to(device)
            idx = torch.tensor(ids, dtype=torch.long, device=device)
            cond = tab[idx]
            uncond = tab[-1:].expand(len(ids), -1, -1).contiguous()
            return Conditioning({"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond})

    return LoadedModel(
        name=name,
        transformer=model,
        adapter=adapter,
        latent_shape=latent_shape,
        make_condition=make_condition,
        class_names=class_names,
        is_video=name == "reference-video",
        judge=_JUDGES[name],
        extras=extras,
    )
