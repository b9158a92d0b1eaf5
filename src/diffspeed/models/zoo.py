"""Random-weight diffusers transformers built offline from configs: tests, smoke runs and speed benchmarks.

Two kinds of entries:

* ``tiny-*`` (``tiny-dit``, ``tiny-pixart``, ``tiny-sd3``, ``tiny-flux``, ``tiny-wan``,
  ``tiny-cogvideox``): one per supported family, 2 blocks per block group, hidden size 32, a few
  dozen tokens; a forward takes milliseconds on a CPU. For unit tests of methods and adapters.
* real-size random weights (``dit-xl-2``: DiT-XL/2 at 256 px, the facebook/DiT-XL-2-256 config;
  ``wan-1.3b``: the Wan2.1-T2V-1.3B dimensions, 81 frames at 480x832): for speed and memory
  benchmarks where image quality is meaningless but shapes and FLOPs are real.

**Weights.** Built with diffusers' own initialisation under a seeded RNG (``torch.manual_seed(seed)``
inside :func:`torch.random.fork_rng`, so the caller's RNG is untouched). Parameters are created
**directly on the target device and in the target dtype** (``torch.set_default_dtype`` plus a
``torch.device`` context during construction), so a real-size model never exists twice in memory
and never goes through a CPU copy; parameters listed in the class's ``_keep_in_fp32_modules`` are
then upcast to float32, as ``from_pretrained`` does. A consequence: weights are deterministic for a
(seed, device type, dtype), not across devices. ``device="meta"`` builds a storage-less skeleton
(parameter counting, structure inspection). Afterwards :func:`rerandomize_zero_params_` refills every
all-zero parameter (e.g. zero-initialised adaLN / output projections of some diffusers versions,
LayerNorm biases) from a seeded normal, so that no branch is trivially zero and a cache cannot
"match" a model that ignores its input.

**Conditioning.** ``make_condition(labels, device)`` returns, for text models, a fixed random
encoder state per label (seeded by (seed, label), the same in any batch; different labels differ)
and zeros as the unconditional branch; for DiT, ``class_labels`` and the null class
(``num_embeds_ada_norm``) as unconditional.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..adapters import get_adapter
from ..errors import DiffspeedError
from .bundle import Conditioning, LoadedModel


@dataclass(frozen=True)
class ZooSpec:
    class_name: str  # diffusers model class
    config: dict[str, Any]
    latent_shape: tuple[int, ...]  # per sample
    text_len: int | None = None  # encoder tokens for make_condition (text models)
    is_video: bool = False
    description: str = ""
    extras: dict[str, Any] = field(default_factory=dict)


_TINY = dict(num_attention_heads=2, attention_head_dim=16)

ZOO: dict[str, ZooSpec] = {
    "tiny-dit": ZooSpec(
        "DiTTransformer2DModel",
        dict(_TINY, in_channels=4, out_channels=8, num_layers=2, sample_size=8, patch_size=2,
             num_embeds_ada_norm=10, norm_num_groups=32),
        latent_shape=(4, 8, 8),
        description="2-block class-conditional DiT, 10 classes, learned sigma",
    ),
    "tiny-pixart": ZooSpec(
        "PixArtTransformer2DModel",
        dict(_TINY, in_channels=4, out_channels=8, num_layers=2, sample_size=8, patch_size=2,
             cross_attention_dim=32, caption_channels=24, use_additional_conditions=False),
        latent_shape=(4, 8, 8),
        text_len=8,
        description="2-block PixArt with cross-attention to 8 text tokens",
    ),
    "tiny-sd3": ZooSpec(
        "SD3Transformer2DModel",
        dict(_TINY, sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
             joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=16,
             pos_embed_max_size=16, qk_norm="rms_norm"),
        latent_shape=(4, 8, 8),
        text_len=8,
        description="2-block SD3 MMDiT (last block context_pre_only)",
    ),
    "tiny-flux": ZooSpec(
        "FluxTransformer2DModel",
        dict(_TINY, patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
             joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=True,
             axes_dims_rope=(4, 6, 6)),
        latent_shape=(4, 8, 8),
        text_len=8,
        description="2 double + 2 single Flux blocks, guidance-distilled",
    ),
    "tiny-wan": ZooSpec(
        "WanTransformer3DModel",
        dict(_TINY, patch_size=(1, 2, 2), in_channels=4, out_channels=4, text_dim=24, freq_dim=32,
             ffn_dim=64, num_layers=2, rope_max_seq_len=64),
        latent_shape=(4, 3, 8, 8),
        text_len=8,
        is_video=True,
        description="2-block Wan video transformer, 3 latent frames",
    ),
    "tiny-cogvideox": ZooSpec(
        "CogVideoXTransformer3DModel",
        dict(_TINY, in_channels=4, out_channels=4, time_embed_dim=32, text_embed_dim=24, num_layers=2,
             sample_width=8, sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
             max_text_seq_length=8),
        latent_shape=(4, 3, 8, 8),
        text_len=8,
        is_video=True,
        description="2-block CogVideoX (sin-cos positions), 3 latent frames",
    ),
    # ---- real sizes, random weights ----------------------------------------------------------
    "dit-xl-2": ZooSpec(
        "DiTTransformer2DModel",
        dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
             sample_size=32, patch_size=2, num_embeds_ada_norm=1000, activation_fn="gelu-approximate",
             attention_bias=True, norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_num_groups=32,
             upcast_attention=False, dropout=0.0),
        latent_shape=(4, 32, 32),
        description="DiT-XL/2 256px dimensions (facebook/DiT-XL-2-256), ~675M parameters, random weights",
    ),
    "wan-1.3b": ZooSpec(
        "WanTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
             text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
             rope_max_seq_len=1024),
        latent_shape=(16, 21, 60, 104),  # 81 frames at 480x832
        text_len=512,
        is_video=True,
        description="Wan2.1-T2V-1.3B dimensions, 81 frames 480x832 latents, ~1.4B parameters, random weights",
    ),
}


def zoo_names() -> list[str]:
    """Names accepted by :func:`build_model`, tiny models first."""
    return list(ZOO)


def zoo_spec(name: str) -> ZooSpec:
    try:
        return ZOO[name]
    except KeyError:
        raise DiffspeedError(f"unknown zoo model {name!r}; known: {', '.join(zoo_names())}") from None


# ---- construction ---------------------------------------------------------------------------
@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def construct(class_name: str, config: dict[str, Any], *, seed: int = 0, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> nn.Module:
    """Instantiate a diffusers model class from ``config`` on ``device`` in ``dtype`` with seeded init."""
    import diffusers

    cls = getattr(diffusers, class_name)
    device = torch.device(device)
    if not dtype.is_floating_point:
        raise DiffspeedError(f"model dtype must be a floating point dtype, got {dtype}")
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        with _default_dtype(dtype), device:
            model = cls(**config)
    keep = getattr(cls, "_keep_in_fp32_modules", None) or []
    if keep and dtype != torch.float32 and device.type != "meta":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.is_floating_point() and any(k in name.split(".") for k in keep):
                    param.data = param.data.float()
    return model.eval()


@torch.no_grad()
def rerandomize_zero_params_(model: nn.Module, seed: int = 0, std: float = 0.02) -> list[str]:
    """Refill every all-zero floating parameter with N(0, std^2) from a seeded CPU generator.

    Returns the names of the parameters it changed. Parameters on the meta device are skipped.
    The values depend only on (seed, parameter order), not on the device.
    """
    gen = torch.Generator().manual_seed(int(seed))
    changed = []
    for name, param in model.named_parameters():
        if param.device.type == "meta" or not param.is_floating_point() or param.numel() == 0:
            continue
        if bool((param == 0).all()):
            values = torch.randn(tuple(param.shape), generator=gen, dtype=torch.float32) * std
            param.copy_(values.to(device=param.device, dtype=param.dtype))
            changed.append(name)
    return changed


# ---- conditioning and pixels ----------------------------------------------------------------
def _label_seed(seed: int, label: int, key_index: int) -> int:
    return (int(seed) * 1_000_003 + int(label) * 7_919 + key_index * 104_729 + 12_345) % (2**63)


def _float_dtype(model: nn.Module) -> torch.dtype:
    dtype = next(model.parameters()).dtype
    return dtype if dtype.is_floating_point else torch.float32


def _text_condition_fn(model: nn.Module, shapes: dict[str, tuple[int, ...]], seed: int):
    def make_condition(labels: Sequence[int], device: torch.device) -> Conditioning:
        if len(labels) == 0:
            raise DiffspeedError("at least one label is needed")
        dtype = _float_dtype(model)
        cond, uncond = {}, {}
        for index, (key, shape) in enumerate(shapes.items()):
            rows = [
                torch.randn(shape, generator=torch.Generator().manual_seed(_label_seed(seed, label, index)))
                for label in labels
            ]
            cond[key] = torch.stack(rows).to(device=device, dtype=dtype)
            uncond[key] = torch.zeros_like(cond[key])
        return Conditioning(cond, uncond)

    return make_condition


def class_condition_fn(num_classes: int):
    def make_condition(labels: Sequence[int], device: torch.device) -> Conditioning:
        if len(labels) == 0:
            raise DiffspeedError("at least one label is needed")
        bad = [int(x) for x in labels if not 0 <= int(x) < num_classes]
        if bad:
            raise DiffspeedError(f"class labels must be in [0, {num_classes}), got {bad}")
        cond = torch.tensor([int(x) for x in labels], dtype=torch.long, device=device)
        uncond = torch.full_like(cond, num_classes)  # the null class of DiT's label embedding
        return Conditioning({"class_labels": cond}, {"class_labels": uncond})

    return make_condition


def latents_to_pixels(x: torch.Tensor) -> torch.Tensor:
    """(B, C, ...) latents -> (B, 3, ...) in [0, 1]: the first 3 channels (cycled if fewer), (x+1)/2."""
    channels = x.shape[1]
    if channels >= 3:
        rgb = x[:, :3]
    else:
        rgb = x[:, [i % channels for i in range(3)]]
    return (rgb.float().clamp(-1, 1) + 1) / 2


# ---- public entry ---------------------------------------------------------------------------
def build_model(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> LoadedModel:
    """Build zoo model ``name`` with seeded random weights; see the module docstring."""
    spec = zoo_spec(name)
    model = construct(spec.class_name, spec.config, seed=seed, dtype=dtype, device=device)
    changed = rerandomize_zero_params_(model, seed=seed)
    # plain attribute read by the adapters' default_latent_shape (Flux/Wan configs carry no size)
    model.diffspeed_latent_shape = tuple(spec.latent_shape)
    adapter = get_adapter(model)
    if spec.class_name == "DiTTransformer2DModel":
        num_classes = int(model.config.num_embeds_ada_norm)
        make_condition = class_condition_fn(num_classes)
        class_names = [f"class {i}" for i in range(num_classes)]
    else:
        shapes = adapter.condition_shapes(model, spec.text_len)
        make_condition = _text_condition_fn(model, shapes, seed)
        class_names = None
    return LoadedModel(
        name=name,
        transformer=model,
        adapter=adapter,
        latent_shape=tuple(spec.latent_shape),
        make_condition=make_condition,
        to_pixels=latents_to_pixels,
        class_names=class_names,
        is_video=spec.is_video,
        extras={
            "source": "zoo",
            "random_weights": True,
            "seed": seed,
            "description": spec.description,
            "rerandomized_params": changed,
            **spec.extras,
        },
    )
