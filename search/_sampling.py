"""How recipes are proposed: the spec's Optuna sampler, and its space sampled by a trial."""

from __future__ import annotations

from typing import Any

import optuna

from ..spaces import Choice, FloatRange, Recipe
from ._spec import StudySpec


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """The spec's sampler (``nsga2``, ``tpe`` or ``random``), seeded with its seed."""
    name, seed = spec.sampler.name, spec.seed
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=spec.sampler.population_size,
                                             seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=seed)


def suggest_recipe(trial: optuna.Trial, spec: StudySpec) -> Recipe:
    """Sample the spec's space through an Optuna trial and return the Recipe."""
    params: dict[str, Any] = {}
    for name, domain in spec.space.searched().items():
        if isinstance(domain, FloatRange):
            params[name] = trial.suggest_float(name, domain.low, domain.high, step=domain.step)
        elif isinstance(domain, Choice):
            params[name] = trial.suggest_categorical(name, list(domain.values))
    return spec.space.recipe(params)
