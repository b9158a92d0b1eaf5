"""torch.compile as a recipe step, so every recipe can be measured compiled.

Compiles the transformer's call (``nn.Module.compile`` semantics: the module object stays the same,
so hooks, adapters and other methods keep working) and undoes it on ``remove()``.

Modes: ``"default"``; ``"max-autotune-no-cudagraphs"``; ``"reduce-overhead"`` (CUDA graphs: the
batch-1 latency win, since a small DiT forward is launch-bound). Under CUDA graphs the outputs live
in a static buffer overwritten by the next replay, so this method marks each step and clones the
output. Methods whose decisions are Python control flow on tensor values (e.g. a cache deciding to
skip) cause graph breaks or recompiles; they say so in their ``compile_note``. Always applied last.

``scope="blocks"`` is regional compilation: each transformer block's own forward is compiled and
placed *under* every other method's wrappers, so a cache's skip decision stays in eager Python
(no graph breaks, no recompiles) while the work it does not skip runs compiled. This is the scope to
use with the caches; ``scope="model"`` compiles the whole call (best for a plain model).

``tune_kernels=True`` adds Inductor's coordinate-descent tuning of the Triton kernels it generates
(block sizes of the fused norm / activation-quantization reductions; ``max-autotune`` modes already
include it). It lengthens the compile, and mostly pays off for quantized models, whose activation
quantization is such a reduction. torchao's quantization configs switch the same tuning on for the
whole process when applied; diffspeed keeps it per compile call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapters.base import ModelAdapter
from ..errors import DiffspeedError
from ._validate import require_bool
from .base import MethodConfig, MethodHandle, Stage, register_method

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CompileConfig(MethodConfig):
    """``torch.compile`` the transformer. ``backend="eager"`` only traces (tests, debugging)."""

    method: ClassVar[str] = "compile"
    stage: ClassVar[Stage] = Stage.COMPILE

    mode: str = "default"
    backend: str = "inductor"
    fullgraph: bool = False
    dynamic: bool = False
    scope: str = "model"
    tune_kernels: bool = False

    def __post_init__(self) -> None:
        for name in ("tune_kernels", "fullgraph", "dynamic"):
            require_bool("compile", name, getattr(self, name))
        if self.scope not in ("model", "blocks"):
            raise DiffspeedError(f"compile scope must be 'model' or 'blocks' (regional, for caches), got {self.scope!r}")
        if self.mode not in MODES:
            raise DiffspeedError(f"compile mode must be one of {MODES}, got {self.mode!r}")
        if self.backend not in ("inductor", "eager", "aot_eager", "cudagraphs"):
            raise DiffspeedError(
                f"compile backend {self.backend!r} is not supported; use 'inductor' (default) or 'eager' for tracing only"
            )

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.mode in ("reduce-overhead", "max-autotune") and self.backend == "inductor"


def _clone_tree(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, tuple):
        return tuple(_clone_tree(v) for v in x)
    if isinstance(x, list):
        return [_clone_tree(v) for v in x]
    if isinstance(x, dict):
        return {k: _clone_tree(v) for k, v in x.items()}
    if hasattr(x, "to_tuple") and hasattr(x, "keys"):  # diffusers BaseOutput
        return type(x)(**{k: _clone_tree(v) for k, v in x.items()})
    return x


@register_method(CompileConfig)
def apply_compile(model: nn.Module, config: CompileConfig, adapter: ModelAdapter) -> MethodHandle:
    handle = MethodHandle(model, config)
    if getattr(model, "_compiled_call_impl", None) is not None:
        raise DiffspeedError("the transformer is already compiled outside diffspeed; pass the uncompiled model")
    options: dict[str, Any] = {"backend": config.backend, "fullgraph": config.fullgraph, "dynamic": config.dynamic}
    if config.backend == "inductor":
        if config.tune_kernels:  # torch.compile takes a mode or options, not both: spell the mode out
            from torch._inductor import list_mode_options

            tuned = dict(list_mode_options(config.mode))
            tuned.update(coordinate_descent_tuning=True, coordinate_descent_check_all_directions=True)
            options["options"] = tuned
        else:
            options["mode"] = config.mode
    calls = {"compiled_calls": 0}
    if config.scope == "blocks":
        return _compile_blocks(model, config, adapter, options, handle, calls)
    compiled = torch.compile(model._call_impl, **options)

    if config.uses_cuda_graphs:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls["compiled_calls"] += 1
            torch.compiler.cudagraph_mark_step_begin()
            return _clone_tree(compiled(*args, **kwargs))
    else:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls["compiled_calls"] += 1
            return compiled(*args, **kwargs)

    model._compiled_call_impl = call  # what nn.Module.compile() sets; __call__ dispatches to it

    def undo() -> None:
        model._compiled_call_impl = None

    handle.on_remove(undo)
    handle.stats = calls  # live view: compiled calls so far
    return handle


def _compile_blocks(model: nn.Module, config: CompileConfig, adapter: ModelAdapter, options: dict[str, Any],
                    handle: MethodHandle, calls: dict[str, float]) -> MethodHandle:
    """Regional compile: each block's class forward, compiled, as the innermost forward wrapper."""
    from ..hooks import wrap_forward

    for _, block, _ in adapter.blocks(model):
        compiled = torch.compile(type(block).forward.__get__(block, type(block)), **options)

        def run(inner: Any, *args: Any, _fn: Any = compiled, **kwargs: Any) -> Any:
            calls["compiled_calls"] += 1
            if config.uses_cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
                return _clone_tree(_fn(*args, **kwargs))
            return _fn(*args, **kwargs)

        handle.on_remove(wrap_forward(block, run, innermost=True).remove)
    handle.stats = calls
    return handle
