"""Acceleration methods. Importing this package registers every built-in method (one file each)."""

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

# importing each module registers its handler
from .block_cache import BlockCacheConfig
from .compile import CompileConfig
from .erta_cache import ErtaCacheConfig
from .fuse_qkv import FuseQKVConfig
from .error_compensation import ErrorCompensationConfig
from .lazy import LazyConfig
from .motion_cache import MotionCacheConfig
from .ptq import PTQConfig
from .quantize import QuantizeConfig
from .region_adaptive import RegionAdaptiveConfig
from .slicing import SlicingConfig
from .sparse_attention import SparseAttentionConfig
from .step_cache import StepCacheConfig
from .token_merge import TokenMergeConfig

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
    "BlockCacheConfig",
    "CompileConfig",
    "ErtaCacheConfig",
    "FuseQKVConfig",
    "LazyConfig",
    "MotionCacheConfig",
    "QuantizeConfig",
    "RegionAdaptiveConfig",
    "SlicingConfig",
    "SparseAttentionConfig",
    "StepCacheConfig",
    "TokenMergeConfig",
]
