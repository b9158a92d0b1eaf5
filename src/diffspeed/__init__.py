"""diffspeed: make diffusion transformers fast and small, and prove it with measured quality."""

from __future__ import annotations

__version__ = "0.1.0"

from . import adapters as adapters  # registers the model adapters
from .context import StepContext, generation, get_context
from .errors import DiffspeedError
from .methods import MethodConfig, MethodHandle, apply, method_names
from .recipe import Recipe, RecipeHandle, apply_recipe

__all__ = [
    "DiffspeedError",
    "MethodConfig",
    "MethodHandle",
    "Recipe",
    "RecipeHandle",
    "StepContext",
    "apply",
    "apply_recipe",
    "generation",
    "get_context",
    "method_names",
]
