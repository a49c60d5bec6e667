"""How recipes are proposed: the spec's Optuna sampler, and its space sampled by a trial."""

from __future__ import annotations

import math
import random
from collections.abc import Collection
from typing import Any

import optuna
from optuna.trial import TrialState

from ..spaces import Choice, FloatRange, Recipe, technique
from ._spec import StudySpec


def make_sampler(spec: StudySpec, population: int | None = None
                 ) -> optuna.samplers.BaseSampler:
    """The spec's sampler (``nsga2``, multivariate ``tpe``, ``gp``: Gaussian process, or
    ``random``), seeded with its seed; each reads the trials' quality constraint.
    ``population`` replaces NSGA-II's generation size (``sampler.population_size``)."""
    name, seed = spec.sampler.name, spec.seed
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(
            population_size=population or spec.sampler.population_size, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
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


# Parameters that shrink the model's structure, in the order seeds combine them.
_STRUCTURAL = ("student.width", "pruning.ratio", "pruning.heads", "low_rank.energy",
               "low_rank.rank_fraction", "sparsity.ratio", "student.depth")
_SCHEME = "quantization.scheme"
_PREFERRED_SCHEMES = ("int8_static", "int8_dynamic", "int8_weight_only", "bf16")


def enqueue_seeds(study: optuna.Study, spec: StudySpec) -> int:
    """Enqueue the spec's seed recipes (``seeds``: ``"auto"`` or its own list) as the first
    trials of a study that has none; return how many."""
    if study.get_trials(deepcopy=False):
        return 0
    seeds = auto_seeds(spec) if spec.seeds == "auto" else list(spec.seeds)
    for params in seeds:
        study.enqueue_trial(params, skip_if_exists=True)
    return len(seeds)


def auto_seeds(spec: StudySpec) -> list[dict[str, Any]]:
    """Informative first recipes, at most a generation (``sampler.population_size``): the
    best-kept numeric scheme alone; each structural technique at half its range with it;
    the far width with half the pruning (the small, fast compound, early enough that a
    promotion to a longer fine-tune still fits the time budget); then width and pruning
    together at half, and each at the far end of its range. Parameters a seed does not set
    take their default (the technique off) where the domain allows."""
    searched = spec.space.searched()
    base = {name: _strength(name, domain, 0.0) for name, domain in searched.items()}
    scheme = base.get(_SCHEME)
    if _SCHEME in searched:
        scheme = next((s for s in _PREFERRED_SCHEMES if s in searched[_SCHEME].values),
                      scheme)
    structural = [n for n in _STRUCTURAL if n in searched]
    plans: list[dict[str, float]] = [{}]
    plans += [{name: 0.5} for name in structural]
    if len(structural) >= 2:
        plans += [{structural[0]: 1.0, structural[1]: 0.5},
                  {name: 0.5 for name in structural[:2]}]
    plans += [{name: 1.0} for name in structural[:2]]
    seeds: list[dict[str, Any]] = []
    for plan in plans:
        params = dict(base) | ({_SCHEME: scheme} if scheme is not None else {})
        params |= {n: _strength(n, searched[n], t) for n, t in plan.items()}
        if params not in seeds:
            seeds.append(params)
    return seeds[: spec.sampler.population_size]


def _strength(name: str, domain: Any, strength: float) -> Any:
    """The domain's value at ``strength`` from the parameter's default (0: the default, or
    the nearest value to it; 1: the value farthest from it)."""
    section, key = name.split(".")
    default = getattr(technique(section).config(), key)
    if isinstance(domain, FloatRange):
        far = domain.high if abs(domain.high - default) >= abs(domain.low - default) \
            else domain.low
        near = min(max(default, domain.low), domain.high)
        value = near + strength * (far - near)
        if domain.step is not None:
            steps = math.floor((value - domain.low) / domain.step + 0.5 + 1e-9)
            value = domain.low + steps * domain.step
        return round(value, 10)
    values = list(domain.values)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        ordered = sorted(values, key=lambda v: abs(v - default))
    else:
        ordered = sorted(values, key=lambda v: v != default)
    return ordered[math.floor(strength * (len(ordered) - 1) + 0.5)]


def enqueue_untried(study: optuna.Study, spec: StudySpec, draws: int = 200) -> bool:
    """Enqueue a recipe of the spec's space that no trial of ``study`` has run or holds,
    drawn at random, so the next trial runs it rather than the sampler's repeat; False when
    ``draws`` draws found none (the space is, as far as draws can tell, exhausted)."""
    tried = []
    for t in study.get_trials(deepcopy=False):
        params = t.params if t.state != TrialState.WAITING else t.system_attrs.get(
            "fixed_params", {})
        try:
            tried.append(spec.space.recipe(params))
        except (KeyError, TypeError, ValueError):
            continue  # a trial that stopped before its recipe was sampled
    params = untried_params(spec, tried, random.Random(f"{spec.seed}:{len(tried)}"), draws)
    if params is None:
        return False
    study.enqueue_trial(params)
    return True


def untried_params(spec: StudySpec, tried: Collection[Recipe], rng: random.Random,
                   draws: int = 200) -> dict[str, Any] | None:
    """The parameters of a recipe of the spec's space not in ``tried``, drawn at random;
    None when ``draws`` draws found none."""
    for _ in range(draws):
        params = {name: _draw(domain, rng) for name, domain in spec.space.searched().items()}
        if spec.space.recipe(params) not in tried:
            return params
    return None


def _draw(domain: Any, rng: random.Random) -> Any:
    if isinstance(domain, FloatRange):
        if domain.step is None:
            return rng.uniform(domain.low, domain.high)
        steps = round((domain.high - domain.low) / domain.step)
        return domain.snap(domain.low + rng.randint(0, steps) * domain.step)
    return rng.choice(list(domain.values))
