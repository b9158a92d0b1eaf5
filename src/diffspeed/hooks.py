"""Removable forward wrappers.

Methods change behaviour by wrapping a module's ``forward``. Several methods may wrap the same
module; each wrapper gets a :class:`WrapHandle` and removal in any order rebuilds the chain from
the original forward, so after every handle is removed the module's ``forward`` is exactly what it
was before (the instance attribute is deleted if there was none): outputs are bit-identical.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

# wrapper(inner_forward, *args, **kwargs) -> output
Wrapper = Callable[..., Any]

_CHAIN_ATTR = "_diffspeed_forward_chain"
_MISSING = object()


class _Chain:
    def __init__(self, module: nn.Module) -> None:
        self.original_instance_forward = module.__dict__.get("forward", _MISSING)
        self.wrappers: list[tuple[int, Wrapper]] = []
        self.next_id = 0

    def base_forward(self, module: nn.Module) -> Callable[..., Any]:
        if self.original_instance_forward is not _MISSING:
            return self.original_instance_forward
        return type(module).forward.__get__(module, type(module))

    def rebuild(self, module: nn.Module) -> None:
        if not self.wrappers:
            if self.original_instance_forward is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = self.original_instance_forward
            module.__dict__.pop(_CHAIN_ATTR, None)
            return
        fn = self.base_forward(module)
        for _, wrapper in self.wrappers:  # first added is innermost
            fn = functools.partial(wrapper, fn)
        module.__dict__["forward"] = fn


class WrapHandle:
    """Undoes one :func:`wrap_forward`."""

    def __init__(self, module: nn.Module, wrapper_id: int) -> None:
        self.module = module
        self.wrapper_id = wrapper_id
        self.removed = False

    def remove(self) -> None:
        if self.removed:
            return
        chain: _Chain | None = self.module.__dict__.get(_CHAIN_ATTR)
        if chain is not None:
            chain.wrappers = [(i, w) for i, w in chain.wrappers if i != self.wrapper_id]
            chain.rebuild(self.module)
        self.removed = True


def wrap_forward(module: nn.Module, wrapper: Wrapper, innermost: bool = False) -> WrapHandle:
    """Wrap ``module.forward`` with ``wrapper(inner, *args, **kwargs)``; returns a removable handle.

    Wrappers nest in the order they are added (the last added runs first); ``innermost=True`` puts
    this one next to the original forward instead, e.g. a compiled forward under cache wrappers.
    """
    chain: _Chain | None = module.__dict__.get(_CHAIN_ATTR)
    if chain is None:
        chain = _Chain(module)
        module.__dict__[_CHAIN_ATTR] = chain
    wrapper_id = chain.next_id
    chain.next_id += 1
    if innermost:
        chain.wrappers.insert(0, (wrapper_id, wrapper))
    else:
        chain.wrappers.append((wrapper_id, wrapper))
    chain.rebuild(module)
    return WrapHandle(module, wrapper_id)


def is_wrapped(module: nn.Module) -> bool:
    return _CHAIN_ATTR in module.__dict__


def output_tensor(out: Any) -> torch.Tensor | None:
    """The prediction in a transformer's output: the tensor itself, the first item of a tuple / list, or
    ``.sample`` (diffusers' output classes); None if there is none."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    return sample if isinstance(sample, torch.Tensor) else None
