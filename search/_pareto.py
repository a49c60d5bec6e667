"""Pareto-optimal points of a study: the point record, dominance and the knee."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ._dominance import dominated
from ._store import StudyStore


@dataclass(frozen=True)
class FrontPoint:
    """One Pareto-optimal trial: its objective values, recipe and all recorded metrics."""

    number: int
    values: dict[str, float]
    recipe: dict[str, Any]
    metrics: dict[str, Any]


def front_point(trial: FrozenTrial, names: Sequence[str]) -> FrontPoint:
    """A completed trial as a point, its values named by the study's objectives."""
    record = StudyStore.record(trial)
    return FrontPoint(trial.number, dict(zip(names, trial.values, strict=True)),
                      record.recipe, record.metrics)


def pareto_front(study: optuna.Study) -> list[FrontPoint]:
    """Feasible Pareto-optimal completed trials, by trial number; a trial that repeated an
    earlier recipe (and reused its figures) is listed once, under the earlier number."""
    names = StudyStore(study).objective_names()
    points = [front_point(t, names) for t in study.best_trials
              if StudyStore.record(t).duplicate_of is None]
    return sorted(points, key=lambda p: p.number)


def completed_points(study: optuna.Study) -> list[FrontPoint]:
    """Every completed trial of ``study`` as a point, by trial number."""
    names = StudyStore(study).objective_names()
    return [front_point(t, names)
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


def knee(points: Sequence[FrontPoint], names: Sequence[str],
         maximize: Sequence[bool]) -> FrontPoint:
    """The point of the Pareto front of ``points`` (on objectives ``names``) closest to the
    ideal point once each objective is scaled to [0, 1] over that front; ties go to the
    lower trial number."""
    losses = {p.number: [(-1.0 if up else 1.0) * p.values[n]
                         for n, up in zip(names, maximize, strict=True)] for p in points}
    every = list(losses.values())
    front = [p for p in points if not dominated(losses[p.number], every)]
    lows = [min(losses[p.number][i] for p in front) for i in range(len(names))]
    highs = [max(losses[p.number][i] for p in front) for i in range(len(names))]

    def distance(p: FrontPoint) -> float:
        scaled = [(v - lo) / (hi - lo) if hi > lo else 0.0
                  for v, lo, hi in zip(losses[p.number], lows, highs, strict=True)]
        return math.sqrt(sum(s * s for s in scaled))

    return min(front, key=lambda p: (distance(p), p.number))


def within_noise(points: Sequence[FrontPoint]) -> set[int]:
    """Numbers of the points whose place on the front rests on a latency difference inside
    the timing noise: another point is at least as good in every other figure and its
    speedup's 95% interval overlaps this one's (either may be the faster)."""
    marked = set()
    for p in points:
        for q in points:
            if q is p or not _overlap(p.metrics, q.metrics):
                continue
            others = [(n, v) for n, v in p.values.items() if n != "latency_ms"]
            better = all((q.values[n] >= v) if n == "quality" else (q.values[n] <= v)
                         for n, v in others if n in q.values)
            if better:
                marked.add(p.number)
                break
    return marked


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    bounds = [(m.get("speedup_low"), m.get("speedup_high")) for m in (a, b)]
    if any(not isinstance(v, (int, float)) or not math.isfinite(v) for pair in bounds
           for v in pair):
        return False
    (low_a, high_a), (low_b, high_b) = bounds
    return low_a <= high_b and low_b <= high_a
