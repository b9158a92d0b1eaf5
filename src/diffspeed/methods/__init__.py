"""Acceleration methods. Importing this package registers every built-in method."""

from .base import (
    MethodConfig,
    MethodHandle,
    Stage,
    applied_methods,
    apply,
    config_class,
    config_from_dict,
    method_names,
    register_method,
)
from . import compile as _compile  # noqa: F401  (registers)
from .compile import CompileConfig
from . import step_cache as _step_cache  # noqa: F401
from .step_cache import StepCacheConfig
from . import block_cache as _block_cache  # noqa: F401
from .block_cache import BlockCacheConfig
from .erta_cache import ErtaCacheConfig  # noqa: F401  (importing the module registers erta_cache)
from . import motion_cache as _motion_cache  # noqa: F401
from .motion_cache import MotionCacheConfig

__all__ = [
    "MethodConfig",
    "MethodHandle",
    "Stage",
    "apply",
    "applied_methods",
    "config_class",
    "config_from_dict",
    "method_names",
    "register_method",
    "CompileConfig",
    "StepCacheConfig",
    "BlockCacheConfig",
]
__all__ += ["ErtaCacheConfig"]
from .lazy import LazyConfig  # noqa: E402,F401  (importing the module registers lazy)
__all__ += ["LazyConfig"]
