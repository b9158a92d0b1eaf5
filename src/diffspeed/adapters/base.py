"""Model adapters: the one place that knows a model family's layout.

An adapter answers, for one diffusers model family: which modules are the transformer blocks (in
execution order), how a block passes hidden / encoder hidden states in and out, where attention
lives, how to read the timestep of a forward call, and how to call the model for one denoising
step. Methods and the sampler talk to adapters only, never to a model class directly.

Adapters are found by model class name through :func:`register_adapter`; an unregistered class
raises :class:`UnsupportedModelError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class BlockIO:
    """How one block class passes its states.

    ``hidden_arg``/``encoder_arg`` are the keyword names (hidden states is also positional arg 0,
    encoder hidden states positional arg ``encoder_pos`` when given); ``returns`` lists what the
    block returns, in order: ``("hidden",)`` for a single tensor, ``("encoder", "hidden")`` for
    SD3/Flux style tuples, ``("hidden", "encoder")`` for CogVideoX.
    """

    hidden_arg: str = "hidden_states"
    encoder_arg: str | None = None
    encoder_pos: int | None = None
    returns: tuple[str, ...] = ("hidden",)

    def get_states(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Read (hidden, encoder) from a block call's arguments."""
        hidden = kwargs[self.hidden_arg] if self.hidden_arg in kwargs else args[0]
        encoder = None
        if self.encoder_arg is not None:
            if self.encoder_arg in kwargs:
                encoder = kwargs[self.encoder_arg]
            elif self.encoder_pos is not None and len(args) > self.encoder_pos:
                encoder = args[self.encoder_pos]
        return hidden, encoder

    def split_output(self, out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Turn a block's return value into (hidden, encoder)."""
        if self.returns == ("hidden",):
            return out, None
        values = dict(zip(self.returns, out))
        return values["hidden"], values.get("encoder")

    def make_output(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
        """Build a return value in the block's own format."""
        if self.returns == ("hidden",):
            return hidden
        values = {"hidden": hidden, "encoder": encoder}
        return tuple(values[name] for name in self.returns)

    def pass_through(self, args: tuple, kwargs: dict) -> Any:
        """What a skipped block returns: its input states unchanged, in the block's own format."""
        return self.make_output(*self.get_states(args, kwargs))


@dataclass
class BlockGroup:
    """A run of blocks of one kind, e.g. Flux's double blocks, then its single blocks."""

    name: str  # attribute path on the model, e.g. "transformer_blocks"
    blocks: nn.ModuleList
    io: BlockIO


class ModelAdapter:
    """Base class; subclasses describe one model family. Stateless: one instance serves all models."""

    name: ClassVar[str] = "base"
    model_classes: ClassVar[tuple[str, ...]] = ()
    # scale of the timestep the model's forward expects for sigma=1 (diffusers pipelines pass 1000-scale
    # timesteps for most models; Flux's forward multiplies by 1000 itself and takes sigma directly)
    timestep_scale: ClassVar[float] = 1000.0

    # ---- structure -------------------------------------------------------------------------
    def block_groups(self, model: nn.Module) -> list[BlockGroup]:
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module, BlockIO]]:
        """All transformer blocks in execution order as (fqn, module, io)."""
        out = []
        for group in self.block_groups(model):
            for i, block in enumerate(group.blocks):
                out.append((f"{group.name}.{i}", block, group.io))
        return out

    def attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """diffusers ``Attention`` modules inside the blocks, as (fqn, module)."""
        found = []
        for fqn, block, _ in self.blocks(model):
            for sub_name, sub in block.named_modules():
                if type(sub).__name__ in ("Attention", "WanAttention", "FluxAttention", "JointAttention") or (
                    hasattr(sub, "to_q") and hasattr(sub, "to_k") and hasattr(sub, "to_v")
                ):
                    found.append((f"{fqn}.{sub_name}" if sub_name else fqn, sub))
        return found

    # ---- calls -----------------------------------------------------------------------------
    def timestep_from_call(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The timestep tensor of a model forward call (any scale), or None if absent."""
        if "timestep" in kwargs:
            return kwargs["timestep"]
        return None

    def predict(
        self, model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor, cond: dict[str, Any]
    ) -> torch.Tensor:
        """One model evaluation. ``timestep`` is (B,) on the 1000-scale (sigma * 1000); returns the
        model output in the same layout as ``latents`` (learned-sigma channels dropped)."""
        raise NotImplementedError

    def dummy_condition(
        self, model: nn.Module, batch: int, generator: torch.Generator | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Random (cond, uncond) keyword sets for tests and random-weight benchmarks."""
        raise NotImplementedError

    def default_latent_shape(self, model: nn.Module) -> tuple[int, ...]:
        """Per-sample latent shape, e.g. (C, H, W) or (C, F, H, W)."""
        raise NotImplementedError


_ADAPTERS: dict[str, ModelAdapter] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: register an adapter for each class name in ``cls.model_classes``."""
    inst = cls()
    for name in cls.model_classes:
        _ADAPTERS[name] = inst
    return cls


def registered_model_classes() -> list[str]:
    return sorted(_ADAPTERS)


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile wraps modules in OptimizedModule; adapters describe the original
    return getattr(model, "_orig_mod", model)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``; raises naming the class if none is registered or it has no blocks."""
    model = _unwrap(model)
    for klass in type(model).__mro__:
        adapter = _ADAPTERS.get(klass.__name__)
        if adapter is not None:
            break
    else:
        raise UnsupportedModelError(
            f"no diffspeed adapter for model class {type(model).__name__!r}; supported: "
            f"{', '.join(registered_model_classes())}. Register one with "
            "diffspeed.adapters.register_adapter."
        )
    groups = adapter.block_groups(model)
    if not groups or all(len(g.blocks) == 0 for g in groups):
        names = ", ".join(g.name for g in groups) or "(none)"
        raise UnsupportedModelError(
            f"model class {type(model).__name__!r} has an empty transformer block list "
            f"(looked in: {names}); diffspeed methods need at least one block"
        )
    return adapter


BlockFilter = Callable[[nn.Module, str], bool]
