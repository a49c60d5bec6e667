"""What a study's finished trials can save the next trial: latency figures of structures timed
before, the feasible points it would have to beat, the promotions left, the rung ranking."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from ..evaluators import LATENCY_FIGURES
from ._dominance import dominates
from ._record import TrialRecord
from ._spec import StoppingSpec, StudySpec
from ._stopping import RungPoint
from ._store import StudyStore


@dataclass(frozen=True)
class Guide:
    """What the study knows that can save a trial work; every part optional.

    ``stopping`` (None: never stop early) and ``max_quality_drop`` drive the rungs and the
    quality gate; ``known_latency(fingerprint)`` gives the latency metrics of an identical
    structure timed earlier (with ``latency_cached_from``), or None; ``dominated``, when
    the study holds a candidate, maps ``(latency_ms, size_mb)`` to a feasible trial of at
    least the teacher's quality whose latency and size are both at least as good, or None.
    ``promotions_left`` is how many more trials the study may promote (see StoppingSpec);
    ``extends_front(latency_ms, size_mb)`` says whether a feasible point of that latency
    and size would be faster or smaller than every feasible trial so far; ``ends_at``
    (``time.time()``) is when the run's time budget ends: no promotion runs past it.
    ``rung_points`` are the study's earlier trials at their rungs, for successive halving.
    ``for_promotion``: the trial is a candidate picked for a promotion (see ``Picker``).
    """

    stopping: StoppingSpec | None = None
    max_quality_drop: float = float("inf")
    known_latency: Callable[[str], dict[str, Any] | None] = lambda _fingerprint: None
    dominated: Callable[[float, float], str | None] | None = None
    promotions_left: int = 0
    extends_front: Callable[[float, float], bool] = lambda _latency, _size: True
    ends_at: float = math.inf
    rung_points: tuple[RungPoint, ...] = ()
    for_promotion: bool = False


def guide_data(study: optuna.Study, spec: StudySpec, ends_at: float | None = None
               ) -> dict[str, Any]:
    """The guide's facts as plain data (they travel to Ray workers): latency figures per
    structure fingerprint, the figures of the feasible trials at the teacher's quality or
    better (they may dominate a candidate), the latency and size of every feasible trial,
    how many trials were promoted, and when the run's time budget ends (``ends_at``,
    ``time.time()``; None: no budget)."""
    finished = [(t, r) for t, r in StudyStore(study).trials(TrialState.COMPLETE,
                                                             TrialState.PRUNED)
                if r.duplicate_of is None and r.metrics]
    timed: dict[str, dict[str, Any]] = {}
    best, feasible = [], []
    for trial, record in finished:
        if trial.state != TrialState.COMPLETE:
            continue
        metrics = record.metrics
        if record.structure and record.structure not in timed:
            figures = {k: metrics[k] for k in LATENCY_FIGURES if k in metrics}
            figures["latency_cached_from"] = metrics.get("latency_cached_from", trial.number)
            timed[record.structure] = figures
        drop = metrics.get("quality_drop", math.inf)
        if drop <= spec.constraints.max_quality_drop:
            feasible.append([metrics["latency_ms"], metrics["size_mb"]])
        if drop <= min(0.0, spec.constraints.max_quality_drop):
            best.append([trial.number, metrics["latency_ms"], metrics["size_mb"]])
    promoted = sum(r.promoted for _, r in finished)
    return {"timed": timed, "best": best, "feasible": feasible, "promoted": promoted,
            "ends_at": ends_at,
            "rung_points": _rung_points([r for _, r in finished], spec.finetune.steps)}


def _rung_points(records: list[TrialRecord], steps: int) -> list[list[float]]:
    """``[fraction, slice quality, latency_ms, size_mb]`` of each rung after the start of
    every finished trial whose structure was timed."""
    points = []
    for record in records:
        metrics = record.metrics
        if not ("latency_ms" in metrics and "size_mb" in metrics):
            continue
        for step, quality in record.rungs:
            if 0 < step < steps:
                points.append([step / steps, quality, metrics["latency_ms"],
                               metrics["size_mb"]])
    return points


def guide_for(spec: StudySpec, data: dict[str, Any] | None) -> Guide:
    """The trial guide of ``guide_data`` (None: the stopping rule alone)."""
    data = data or {"timed": {}, "best": []}
    best, feasible = data["best"], data.get("feasible", [])

    def extends_front(latency_ms: float, size: float) -> bool:
        return (not feasible or latency_ms < min(f[0] for f in feasible)
                or size < min(f[1] for f in feasible))

    def dominated(latency_ms: float, size: float) -> str | None:
        for number, latency, size_mb in best:
            if dominates((latency, size_mb), (latency_ms, size), weakly=True):
                return f"trial {number}"
        return None

    return Guide(stopping=spec.stopping, max_quality_drop=spec.constraints.max_quality_drop,
                 known_latency=data["timed"].get, dominated=dominated if best else None,
                 promotions_left=spec.stopping.promotions - data.get("promoted", 0),
                 extends_front=extends_front, ends_at=data.get("ends_at") or math.inf,
                 rung_points=tuple(RungPoint(*p) for p in data.get("rung_points", ())),
                 for_promotion=bool(data.get("for_promotion")))
