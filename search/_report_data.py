"""What a study's report shows, computed as plain data without any plotting library: the
trials as plotted, the Pareto front, the teacher, hypervolume history and importances."""

from __future__ import annotations

import html
import statistics
import warnings
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from ._dominance import dominated
from ._figures import fmt, short_recipe
from ._pareto import FrontPoint, pareto_front
from ._private import compute_hypervolume
from ._store import StudyStore

MIN_TRIALS_FOR_IMPORTANCE = 10
TEACHER_KEYS = ("quality", "latency_ms", "size_mb")


@dataclass(frozen=True)
class TrialPoint:
    """A completed trial as plotted; ``values`` follow ``ReportData.objectives``."""

    number: int
    values: tuple[float, ...]
    feasible: bool
    pareto: bool
    hover: str


@dataclass(frozen=True)
class HypervolumeHistory:
    """Hypervolume of the feasible completed trials after each completed trial.

    ``reference`` is the worst corner, in objective order and original directions.
    """

    reference: tuple[float, ...]
    trial_numbers: tuple[int, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class Importance:
    """Parameter importances for one objective, largest first; empty with a ``note`` why."""

    objective: str
    values: tuple[tuple[str, float], ...]
    note: str = ""


@dataclass(frozen=True)
class ReportData:
    """Everything the report shows, computed from a study without any plotting library."""

    study_name: str
    objectives: tuple[str, ...]
    maximize: tuple[bool, ...]
    completed: int
    failed: int
    teacher: dict[str, float]
    teacher_measurements: int
    max_quality_drop: float | None
    points: tuple[TrialPoint, ...]
    front: tuple[FrontPoint, ...]
    hypervolume: HypervolumeHistory
    importances: tuple[Importance, ...]
    failures: tuple[tuple[int, str], ...]

    @property
    def baseline(self) -> tuple[float | None, ...]:
        """The teacher's value of each objective (None when not recorded)."""
        return tuple(self.teacher.get(name) for name in self.objectives)

    def pairs(self) -> list[tuple[int, int]]:
        """Index pairs of objectives plotted against each other."""
        return list(combinations(range(len(self.objectives)), 2))

    def pair_front(self, i: int, j: int) -> list[TrialPoint]:
        """Feasible points non-dominated on objectives ``i`` and ``j`` alone, by value of i."""
        feasible = [p for p in self.points if p.feasible]
        keys = np.array([[self._loss(p, i), self._loss(p, j)] for p in feasible]).reshape(-1, 2)
        front = [p for p, key in zip(feasible, keys, strict=True) if not dominated(key, keys)]
        return sorted(front, key=lambda p: (p.values[i], p.number))

    def _loss(self, point: TrialPoint, i: int) -> float:
        return -point.values[i] if self.maximize[i] else point.values[i]


def report_data(study: optuna.Study) -> ReportData:
    """Compute what the report of ``study`` shows."""
    names = tuple(StudyStore(study).objective_names())
    maximize = tuple(d == StudyDirection.MAXIMIZE for d in study.directions)
    trials = study.get_trials(deepcopy=False)
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    front = tuple(pareto_front(study)) if completed else ()
    on_front = {p.number for p in front}
    teacher, measurements = _teacher(completed)
    drop_limit = _max_quality_drop(completed)
    points = []
    for t in completed:
        feasible, pareto = _feasible(t), t.number in on_front
        points.append(TrialPoint(t.number, tuple(t.values), feasible, pareto,
                                 _hover(t, names, feasible, pareto)))
    points = tuple(points)
    failures = tuple((t.number, str(StudyStore.record(t).failure or "no reason recorded"))
                     for t in trials if t.state == TrialState.FAIL)
    return ReportData(
        study_name=study.study_name, objectives=names, maximize=maximize,
        completed=len(completed), failed=len(failures), teacher=teacher,
        teacher_measurements=measurements, max_quality_drop=drop_limit, points=points,
        front=front, hypervolume=hypervolume_history(points, maximize, teacher, names),
        importances=parameter_importances(study, names, maximize), failures=failures,
    )


def _feasible(trial: FrozenTrial) -> bool:
    return all(value <= 0.0 for value in trial.constraints.values())


def _teacher(completed: list[FrozenTrial]) -> tuple[dict[str, float], int]:
    """Median of the teacher figures recorded with each trial, and how many there were."""
    teacher, count = {}, 0
    for name in TEACHER_KEYS:
        seen = [StudyStore.record(t).metrics.get(f"baseline_{name}") for t in completed]
        seen = [float(v) for v in seen if isinstance(v, (int, float))]
        if seen:
            teacher[name] = statistics.median(seen)
            count = max(count, len(seen))
    return teacher, count


def _max_quality_drop(completed: list[FrozenTrial]) -> float | None:
    """The feasibility limit, recovered from a trial's drop and its constraint value."""
    for t in completed:
        drop = StudyStore.record(t).metrics.get("quality_drop")
        excess = t.constraints.get("max_quality_drop")
        if isinstance(drop, (int, float)) and excess is not None:
            return round(drop - excess, 9)
    return None


def _hover(trial: FrozenTrial, names: tuple[str, ...], feasible: bool, pareto: bool) -> str:
    metrics = {**dict(zip(names, trial.values, strict=True)),
               **StudyStore.record(trial).metrics}
    status = "Pareto-optimal" if pareto else "feasible" if feasible else "infeasible"
    if not feasible:
        excess = ", ".join(f"{k} exceeded by {v:.4g}" for k, v in trial.constraints.items()
                           if v > 0)
        status += f" ({excess})"
    lines = [f"<b>trial {trial.number}</b>: {status}"]
    if "quality" in metrics:
        lines.append(f"quality {fmt('quality', metrics['quality'])}"
                     + (f" (drop {fmt('quality_drop', metrics['quality_drop'])})"
                        if "quality_drop" in metrics else ""))
    if "latency_ms" in metrics:
        lines.append(f"latency {fmt('latency_ms', metrics['latency_ms'])} ms"
                     + (f" (speedup {fmt('speedup', metrics['speedup'])})"
                        if "speedup" in metrics else ""))
    if "size_mb" in metrics:
        lines.append(f"size {fmt('size_mb', metrics['size_mb'])} MB"
                     + (f" (compression {fmt('compression', metrics['compression'])})"
                        if "compression" in metrics else ""))
    lines += [f"{name} {fmt(name, v)}" for name, v in zip(names, trial.values, strict=True)
              if name not in TEACHER_KEYS]
    lines.append(html.escape(short_recipe(StudyStore.record(trial).recipe)))
    return "<br>".join(lines)


def hypervolume(points: Any, reference: Any) -> float:
    """Volume dominated by ``points`` (rows, all objectives minimized) and bounded by
    ``reference``; points not strictly better than it in every objective add nothing.

    Computed by Optuna's exact WFG implementation, the one its hypervolume plot uses.
    """
    ref = np.asarray(reference, dtype=float)
    pts = np.asarray(points, dtype=float).reshape(-1, len(ref))
    pts = pts[(pts < ref).all(axis=1)]
    return compute_hypervolume(pts, ref) if len(pts) else 0.0


def reference_point(values: list[tuple[float, ...]], maximize: tuple[bool, ...],
                    baseline: tuple[float | None, ...]) -> tuple[float, ...]:
    """The worst corner: per objective, the worst value seen (teacher included) moved 10% of
    the range of values seen further in the worse direction."""
    reference = []
    for i, up in enumerate(maximize):
        seen = [v[i] for v in values] + ([baseline[i]] if baseline[i] is not None else [])
        if not seen:
            reference.append(0.0)
            continue
        margin = 0.1 * ((max(seen) - min(seen)) or abs(seen[0]) or 1.0)
        reference.append(min(seen) - margin if up else max(seen) + margin)
    return tuple(reference)


def hypervolume_history(points: tuple[TrialPoint, ...], maximize: tuple[bool, ...],
                        teacher: dict[str, float], names: tuple[str, ...]) -> HypervolumeHistory:
    """Hypervolume after each completed trial, over the feasible ones so far."""
    reference = reference_point([p.values for p in points], maximize,
                                tuple(teacher.get(n) for n in names))
    signs = np.array([-1.0 if up else 1.0 for up in maximize])
    ref = signs * np.array(reference)
    front = np.empty((0, len(maximize)))
    volume, numbers, volumes = 0.0, [], []
    for p in sorted(points, key=lambda p: p.number):
        loss = signs * np.array(p.values)
        if p.feasible and (loss < ref).all() and not dominated(loss, front):
            front = np.vstack([front[[not dominated(f, loss[None]) for f in front]], loss])
            volume = float(hypervolume(front, ref))
        numbers.append(p.number)
        volumes.append(volume)
    return HypervolumeHistory(reference, tuple(numbers), tuple(volumes))


def parameter_importances(study: optuna.Study, names: tuple[str, ...],
                          maximize: tuple[bool, ...]) -> tuple[Importance, ...]:
    """PED-ANOVA importance (Optuna's default) of each varying parameter for each objective.

    An objective gets a note instead when there are fewer than ``MIN_TRIALS_FOR_IMPORTANCE``
    completed trials, no parameter varied, its values are all equal, or Optuna cannot tell.
    """
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(trials) < MIN_TRIALS_FOR_IMPORTANCE:
        note = (f"needs at least {MIN_TRIALS_FOR_IMPORTANCE} completed trials; "
                f"this study has {len(trials)}")
        return tuple(Importance(name, (), note) for name in names)
    params = sorted({name for t in trials for name in t.params})
    varying = [n for n in params if len({repr(t.params.get(n)) for t in trials}) > 1]
    if not varying:
        note = "no searched parameter took more than one value"
        return tuple(Importance(name, (), note) for name in names)
    quantile = min(0.5, max(0.1, 5 / len(trials)))
    evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=quantile)
    result = []
    for i, name in enumerate(names):
        if len({t.values[i] for t in trials}) == 1:
            result.append(Importance(name, (), f"{name} is the same in every trial"))
            continue
        sign = -1.0 if maximize[i] else 1.0
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                values = optuna.importance.get_param_importances(
                    study, evaluator=evaluator, params=varying,
                    target=lambda t, i=i, sign=sign: sign * t.values[i])
        except Exception as exc:  # one objective Optuna cannot rank must not sink the page
            result.append(Importance(name, (), f"Optuna could not rank the parameters: {exc}"))
            continue
        if any("same set of trials" in str(w.message) for w in caught):
            result.append(Importance(name, (), f"too many ties in {name} to rank parameters"))
            continue
        result.append(Importance(name, tuple((k, float(v)) for k, v in values.items())))
    return tuple(result)
