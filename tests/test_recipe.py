from dataclasses import dataclass
from typing import ClassVar

import pytest

from diffspeed.errors import DiffspeedError, IncompatibleMethodsError
from diffspeed.methods import CompileConfig
from diffspeed.methods.base import MethodConfig, MethodHandle, Stage, register_method
from diffspeed.recipe import Recipe, apply_recipe


@dataclass(frozen=True)
class _ToyA(MethodConfig):
    method: ClassVar[str] = "toy_a"
    stage: ClassVar[Stage] = Stage.STEP
    incompatible: ClassVar[dict] = {"toy_b": "both decide which steps to skip"}
    strength: float = 0.5

    def __post_init__(self):
        if not 0 <= self.strength <= 1:
            raise DiffspeedError(f"strength must be in [0, 1], got {self.strength}")


@dataclass(frozen=True)
class _ToyB(MethodConfig):
    method: ClassVar[str] = "toy_b"
    stage: ClassVar[Stage] = Stage.BLOCK
    sizes: tuple = (1, 2)


@register_method(_ToyA)
def _apply_a(model, config, adapter):
    return MethodHandle(model, config)


@register_method(_ToyB)
def _apply_b(model, config, adapter):
    return MethodHandle(model, config)


def test_round_trip_json(tmp_path):
    recipe = Recipe((_ToyB(sizes=(3, 4)), CompileConfig(backend="eager")), name="r")
    path = tmp_path / "r.json"
    recipe.to_json(path)
    again = Recipe.from_json(path)
    assert again == recipe
    assert Recipe.from_json(recipe.to_json()) == recipe
    assert [m.method for m in again.ordered()] == ["toy_b", "compile"]


def test_refusals():
    with pytest.raises(IncompatibleMethodsError, match="both decide"):
        Recipe((_ToyA(), _ToyB()))
    with pytest.raises(IncompatibleMethodsError, match="twice"):
        Recipe((_ToyB(), _ToyB()))
    with pytest.raises(DiffspeedError, match="unknown method 'nope'"):
        Recipe.from_json('{"methods": [{"method": "nope"}]}')
    with pytest.raises(DiffspeedError, match="not valid JSON"):
        Recipe.from_json("{bad json")
    with pytest.raises(DiffspeedError, match="no option 'speed'"):
        Recipe.from_json('{"methods": [{"method": "toy_a", "speed": 2}]}')
    with pytest.raises(DiffspeedError, match="strength must be"):
        Recipe.from_json('{"methods": [{"method": "toy_a", "strength": 7}]}')
    with pytest.raises(DiffspeedError, match="does not exist"):
        Recipe.from_json("/nonexistent/recipe.json")


def test_apply_recipe_in_stage_order_and_remove(tiny_dit):
    model = tiny_dit.transformer
    handle = apply_recipe(model, Recipe((_ToyA(), CompileConfig(backend="eager"))))
    assert [h.config.method for h in handle.handles] == ["toy_a", "compile"]
    handle.remove()
    from diffspeed.methods import applied_methods

    assert applied_methods(model) == {}
