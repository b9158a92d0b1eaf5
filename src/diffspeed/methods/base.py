"""Method protocol: frozen config dataclasses, a registry from config type to handler, handles.

A method is a frozen dataclass subclassing :class:`MethodConfig` (validated in ``__post_init__``
with errors that name the fix) plus a handler registered with :func:`register_method`. The handler
takes ``(model, config, adapter)`` and returns a :class:`MethodHandle`:

* reversible methods (caches, attention, tokens, compile) undo themselves in ``remove()`` and the
  model's outputs are then bit-identical to before;
* methods that rewrite weights in place have a name ending in ``_`` (torchao's convention) and
  their ``remove()`` raises: reload the model instead.

Handlers are looked up by ``type(config)``; there are no isinstance chains.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, ClassVar, TypeVar

from torch import nn

from ..adapters.base import ModelAdapter, get_adapter
from ..errors import AlreadyAppliedError, DiffspeedError


class Stage(enum.IntEnum):
    """Where a method acts; recipes apply methods in this order."""

    STRUCTURE = 0  # pruning, layer removal
    WEIGHTS = 1  # quantization of linear layers
    ATTENTION = 2  # attention kernels / sparsity
    TOKENS = 3  # token merging / pruning, slicing
    BLOCK = 4  # block-level caches
    STEP = 5  # step-level caches
    COMPILE = 6  # torch.compile: always last


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method config. Subclasses set ``method`` (JSON name) and ``stage``."""

    method: ClassVar[str] = ""
    stage: ClassVar[Stage] = Stage.STEP
    # True for methods that rewrite weights in place (name must end with "_")
    in_place: ClassVar[bool] = False
    # method names this one cannot be combined with, and why
    incompatible: ClassVar[dict[str, str]] = {}
    # why it cannot run under torch.compile, or "" if it can
    compile_note: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    def replace(self, **changes: Any) -> "MethodConfig":
        return dataclasses.replace(self, **changes)


class MethodHandle:
    """Returned by :func:`apply`. ``remove()`` restores the model; ``stats`` counts real work skipped."""

    def __init__(self, model: nn.Module, config: MethodConfig) -> None:
        self.model = model
        self.config = config
        self.stats: dict[str, float] = {}
        self._undo: list[Callable[[], None]] = []
        self.removed = False

    def on_remove(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def remove(self) -> None:
        if self.removed:
            return
        if self.config.in_place:
            raise DiffspeedError(
                f"{self.config.method} rewrote the weights in place and cannot be removed; "
                "reload the model to get the original back"
            )
        for fn in reversed(self._undo):
            fn()
        self._undo.clear()
        _applied(self.model).pop(self.config.method, None)
        self.removed = True

    def __enter__(self) -> "MethodHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"MethodHandle({self.config!r}, removed={self.removed})"


C = TypeVar("C", bound=MethodConfig)
Handler = Callable[[nn.Module, Any, ModelAdapter], MethodHandle]

_HANDLERS: dict[type, Handler] = {}
_CONFIGS: dict[str, type[MethodConfig]] = {}


def register_method(config_cls: type[C]) -> Callable[[Handler], Handler]:
    """Decorator: register ``handler(model, config, adapter) -> MethodHandle`` for ``config_cls``."""
    if not config_cls.method:
        raise TypeError(f"{config_cls.__name__} must set the class attribute `method`")
    if config_cls.in_place and not config_cls.method.endswith("_"):
        raise TypeError(f"in-place method {config_cls.method!r} must end with '_'")

    def deco(fn: Handler) -> Handler:
        _HANDLERS[config_cls] = fn
        _CONFIGS[config_cls.method] = config_cls
        return fn

    return deco


def method_names() -> list[str]:
    return sorted(_CONFIGS)


def config_class(name: str) -> type[MethodConfig]:
    try:
        return _CONFIGS[name]
    except KeyError:
        raise DiffspeedError(f"unknown method {name!r}; known methods: {', '.join(method_names())}") from None


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """Build a config from its JSON form ``{"method": name, **fields}``; unknown fields are refused."""
    if not isinstance(data, dict) or "method" not in data:
        raise DiffspeedError(f"a method entry must be an object with a 'method' key, got {data!r}")
    cls = config_class(data["method"])
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key == "method":
            continue
        if key not in fields:
            raise DiffspeedError(
                f"method {data['method']!r} has no option {key!r}; options: {', '.join(fields) or '(none)'}"
            )
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise DiffspeedError(f"bad options for method {data['method']!r}: {exc}") from None


def _applied(model: nn.Module) -> dict[str, MethodHandle]:
    base = getattr(model, "_orig_mod", model)
    applied = base.__dict__.get("_diffspeed_methods")
    if applied is None:
        applied = {}
        object.__setattr__(base, "_diffspeed_methods", applied)
    return applied


def applied_methods(model: nn.Module) -> dict[str, MethodHandle]:
    """Methods currently applied to ``model``, by name."""
    return dict(_applied(model))


def apply(model: nn.Module, config: MethodConfig, adapter: ModelAdapter | None = None) -> MethodHandle:
    """Apply one method to a transformer and return its handle."""
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise DiffspeedError(f"no handler registered for config type {type(config).__name__}")
    applied = _applied(model)
    if config.method in applied:
        raise AlreadyAppliedError(
            f"method {config.method!r} is already applied to this model; call remove() on its handle first"
        )
    adapter = adapter or get_adapter(model)
    handle = handler(model, config, adapter)
    applied[config.method] = handle
    return handle
