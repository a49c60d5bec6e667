"""Choosing one configuration from a study by a rule: constraints plus an objective or the knee."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna

from ._errors import ParetoslimError
from ._figures import FIGURE_FORMATS
from ._pareto import FrontPoint, completed_points, knee
from ._spec import OBJECTIVES
from ._store import StudyStore


@dataclass(frozen=True)
class PickRule:
    """Constraints every candidate must meet, then what to optimize among them.

    ``max_quality_drop`` defaults to the study's own constraint. With neither ``minimize``,
    ``maximize`` nor ``knee``, the rule minimizes ``latency_ms``. ``knee`` picks the
    Pareto-optimal candidate closest to the ideal point once each objective is scaled to
    [0, 1] over the candidates.
    """

    max_quality_drop: float | None = None
    max_latency_ms: float | None = None
    max_size_mb: float | None = None
    minimize: str | None = None
    maximize: str | None = None
    knee: bool = False

    def __post_init__(self) -> None:
        chosen = [x for x in (self.minimize, self.maximize) if x] + (["knee"] if self.knee else [])
        if len(chosen) > 1:
            raise ParetoslimError(
                f"pick: give one of --minimize, --maximize or --knee. Got {chosen}.")
        for name in ("max_quality_drop", "max_latency_ms", "max_size_mb"):
            value = getattr(self, name)
            if value is not None and (math.isnan(value) or value < 0):
                raise ParetoslimError(f"pick: --{name.replace('_', '-')} must be >= 0. "
                                      f"Got {value}.")


@dataclass(frozen=True)
class Pick:
    """The chosen trial and a sentence saying why."""

    point: FrontPoint
    reason: str


def _limits(study: optuna.Study, rule: PickRule) -> dict[str, float]:
    drop = rule.max_quality_drop
    if drop is None:
        drop = StudyStore(study).spec_record().get("max_quality_drop", 0.01)
    limits = {"quality_drop": drop}
    if rule.max_latency_ms is not None:
        limits["latency_ms"] = rule.max_latency_ms
    if rule.max_size_mb is not None:
        limits["size_mb"] = rule.max_size_mb
    return limits


def _violation(point: FrontPoint, limits: dict[str, float]) -> float:
    total = 0.0
    for key, limit in limits.items():
        value = point.metrics.get(key, math.inf)
        total += max(0.0, value - limit) / max(abs(limit), 1e-9)
    return total


def _describe(point: FrontPoint) -> str:
    drop, latency, size = (FIGURE_FORMATS[k].format(point.metrics.get(k, math.nan))
                           for k in ("quality_drop", "latency_ms", "size_mb"))
    return f"trial {point.number} (quality drop {drop}, {latency} ms, {size} MB)"


def pick(study: optuna.Study, rule: PickRule) -> Pick:
    """Apply ``rule`` to the completed trials of ``study``.

    Raises ParetoslimError when no trial meets the constraints, naming the closest ones.
    """
    points = completed_points(study)
    if not points:
        raise ParetoslimError(f"study {study.study_name!r} has no completed trial to pick from")
    limits = _limits(study, rule)
    fits = [p for p in points if _violation(p, limits) == 0]
    wanted = ", ".join(f"{k} <= {v:g}" for k, v in limits.items())
    if not fits:
        closest = sorted(points, key=lambda p: _violation(p, limits))[:3]
        raise ParetoslimError(
            f"no trial of study {study.study_name!r} meets {wanted}; closest: "
            + "; ".join(_describe(p) for p in closest))
    among = f"among {len(fits)} of {len(points)} completed trials with {wanted}"
    if rule.knee:
        chosen = _knee(study, fits)
        return Pick(chosen, f"{_describe(chosen)}: the knee of the front {among}")
    key, sense = (rule.maximize, "highest") if rule.maximize else (
        rule.minimize or "latency_ms", "lowest")
    _check_metric(key, fits[0].metrics)
    sign = -1.0 if sense == "highest" else 1.0
    chosen = min(fits, key=lambda p: (sign * p.metrics[key], p.number))
    return Pick(chosen, f"{_describe(chosen)}: {sense} {key} ({chosen.metrics[key]:.4g}) "
                        f"{among}")


def _check_metric(key: str, metrics: dict[str, Any]) -> None:
    if key not in metrics or not isinstance(metrics[key], (int, float)):
        numeric = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
        raise ParetoslimError(f"pick: unknown figure {key!r}; choose from {', '.join(numeric)}")


def _knee(study: optuna.Study, points: list[FrontPoint]) -> FrontPoint:
    names = [n for n in StudyStore(study).objective_names() if n in OBJECTIVES]
    return knee(points, names, [OBJECTIVES[n] == "maximize" for n in names])
