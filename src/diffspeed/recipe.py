"""Recipes: an ordered, validated list of method configs, stored as JSON (never pickle).

A recipe is applied in stage order (structure -> weights -> attention -> tokens -> block -> step ->
compile), keeping the user's order within a stage. Validation refuses duplicates and pairs that a
method declares incompatible, with the reason.

JSON form::

    {"diffspeed_recipe": 1, "name": "fast", "methods": [{"method": "step_cache", "threshold": 0.1}]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from torch import nn

from .errors import DiffspeedError, IncompatibleMethodsError
from .methods import base as mbase
from .methods.base import MethodConfig, MethodHandle

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Recipe:
    """An ordered list of method configs. ``Recipe()`` is the full (unaccelerated) model."""

    methods: tuple[MethodConfig, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(self.methods))
        self.validate()

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return "+".join(m.method for m in self.methods) or "full"

    def validate(self) -> None:
        seen: dict[str, MethodConfig] = {}
        for cfg in self.methods:
            if not isinstance(cfg, MethodConfig):
                raise DiffspeedError(f"recipe entries must be method configs, got {type(cfg).__name__}")
            if cfg.method in seen:
                raise IncompatibleMethodsError(f"method {cfg.method!r} appears twice in the recipe")
            for other in seen.values():
                reason = cfg.incompatible.get(other.method) or other.incompatible.get(cfg.method)
                if reason:
                    raise IncompatibleMethodsError(f"{cfg.method!r} cannot be combined with {other.method!r}: {reason}")
            seen[cfg.method] = cfg

    def ordered(self) -> list[MethodConfig]:
        return sorted(self.methods, key=lambda c: int(c.stage))  # stable: keeps order within a stage

    # ---- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"diffspeed_recipe": FORMAT_VERSION, "name": self.name, "methods": [m.to_dict() for m in self.methods]}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: Any) -> "Recipe":
        if isinstance(data, list):
            data = {"methods": data}
        if not isinstance(data, dict) or not isinstance(data.get("methods", []), list):
            raise DiffspeedError("a recipe must be a JSON object with a 'methods' list")
        version = data.get("diffspeed_recipe", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise DiffspeedError(f"recipe format version {version} is not supported (expected {FORMAT_VERSION})")
        return cls(tuple(mbase.config_from_dict(m) for m in data.get("methods", [])), name=str(data.get("name", "")))

    @classmethod
    def from_json(cls, source: str | Path) -> "Recipe":
        """Read a recipe from a file path or a JSON string."""
        text = str(source)
        path = Path(text)
        if not text.lstrip().startswith(("{", "[")):
            if not path.exists():
                raise DiffspeedError(f"recipe file {text!r} does not exist")
            text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DiffspeedError(f"recipe {str(source)[:80]!r} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
        return cls.from_dict(data)


@dataclass
class RecipeHandle:
    """Handles of every applied method; ``remove()`` undoes them in reverse order."""

    handles: list[MethodHandle] = field(default_factory=list)

    @property
    def stats(self) -> dict[str, dict[str, float]]:
        return {h.config.method: dict(h.stats) for h in self.handles}

    def remove(self) -> None:
        for h in reversed(self.handles):
            h.remove()
        self.handles.clear()

    def __enter__(self) -> "RecipeHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def apply_recipe(model: nn.Module, recipe: Recipe | Iterable[MethodConfig]) -> RecipeHandle:
    """Apply every method of ``recipe`` to ``model`` in stage order. On failure, undoes what it applied."""
    if not isinstance(recipe, Recipe):
        recipe = Recipe(tuple(recipe))
    handle = RecipeHandle()
    try:
        for cfg in recipe.ordered():
            handle.handles.append(mbase.apply(model, cfg))
    except Exception:
        for h in reversed(handle.handles):
            if not h.config.in_place:
                h.remove()
        raise
    return handle
