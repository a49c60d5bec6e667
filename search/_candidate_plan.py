"""The structures of a space, enumerated: what the elastic student is trained on, and the
few whose layers the latency model times first."""

from __future__ import annotations

import itertools
from typing import Any

from ..spaces import Choice, FloatRange, Recipe, SearchSpace
from ._sampling import _strength

STRUCTURAL_SECTIONS = ("student", "pruning")
GRID_LIMIT = 256  # structures enumerated at most (a range without step gets 5 points)


def _grid(domain: Any) -> list[Any]:
    if isinstance(domain, FloatRange):
        if domain.step is None:
            return [domain.low + i * (domain.high - domain.low) / 4 for i in range(5)]
        count = round((domain.high - domain.low) / domain.step)
        return [round(domain.low + i * domain.step, 10) for i in range(count + 1)]
    if isinstance(domain, Choice):
        return list(domain.values)
    return [domain.value]


def base_params(space: SearchSpace) -> dict[str, Any]:
    """Each searched parameter at its default (the technique off) where the domain allows."""
    return {n: _strength(n, d, 0.0) for n, d in space.searched().items()}


def structural_recipes(space: SearchSpace) -> list[Recipe]:
    """The space's distinct structures (its student and pruning parameters on their grid,
    the rest at their defaults), the largest first and the smallest last."""
    searched = space.searched()
    names = [n for n in searched if n.split(".")[0] in STRUCTURAL_SECTIONS]
    base = base_params(space)
    recipes: dict[str, Recipe] = {}
    for values in itertools.islice(itertools.product(*(_grid(searched[n]) for n in names)),
                                   GRID_LIMIT):
        recipe = space.recipe(base | dict(zip(names, values, strict=True)))
        recipes.setdefault(structure_key(recipe), recipe)
    return sorted(recipes.values(), key=_shrink)


def structure_key(recipe: Recipe) -> str:
    """What the structural sections of ``recipe`` make of the teacher, as a string."""
    return repr(tuple(getattr(recipe, s) for s in STRUCTURAL_SECTIONS))


def _shrink(recipe: Recipe) -> tuple:
    """Orders structures from the largest: width and depth falling, pruning rising."""
    s, p = recipe.student, recipe.pruning
    return (-s.width * s.depth * (1 - p.ratio) * (1 - p.heads), -s.width, p.ratio)


def timed_recipes(space: SearchSpace) -> list[Recipe]:
    """Every structure of the space under each scheme it searches and in float (the layers
    a recipe keeps float): the layers the latency model times before the first candidate
    is scored, so that no candidate's latency rests on a fit alone (channel counts off
    the kernels' blocking run slower than their MACs say)."""
    schemes = space.searched().get("quantization.scheme")
    names = ["fp32", *(schemes.values if schemes is not None else [])]
    out = []
    for recipe in structural_recipes(space):
        for name in dict.fromkeys(names):
            sections = recipe.to_dict()
            sections.setdefault("quantization", {})["scheme"] = name
            out.append(Recipe.from_dict(sections))
    return out
