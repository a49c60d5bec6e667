"""One trial's flow, the same for every backend: take the proposed recipe, reuse the figures
of a repeat, refuse a recipe stopped before, run it, record it, count it. Backends differ only
in how they schedule: the local and worker backends call ``run_one`` in this process, the Ray
backend proposes on its driver and finishes when a node reports the run."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from ..spaces import Recipe
from ._guide import guide_data
from ._progress import StudyProgress
from ._record import FOR_PROMOTION, TrialResult, prediction_errors
from ._sampling import enqueue_untried
from ._spec import StudySpec
from ._store import StudyStore
from ._tally import OutcomeKind, RunTally


@dataclass(frozen=True)
class Outcome:
    """How a trial ended: ``kind`` is ``new``, ``repeat``, ``stopped`` or ``failed``;
    ``values`` are its objective values when it completed, ``reason`` why it stopped or
    failed."""

    kind: OutcomeKind
    values: tuple[float, ...] | None = None
    reason: str | None = None

    @property
    def state(self) -> TrialState:
        """The state Optuna is told."""
        if self.values is not None:
            return TrialState.COMPLETE
        return TrialState.FAIL if self.kind == "failed" else TrialState.PRUNED


class TrialFlow:
    """The steps every backend takes for one trial of ``spec``; ``progress`` shows them
    (None: silent), ``tally`` counts them."""

    def __init__(self, spec: StudySpec, tally: RunTally, progress: StudyProgress | None):
        self.spec, self.tally, self.progress = spec, tally, progress

    def propose(self, trial: optuna.Trial, recipe: Recipe) -> Outcome | None:
        """Record ``recipe`` on ``trial``; the outcome of a repeat (an earlier run's figures
        copied, or its stop), else None: the recipe is to be run."""
        StudyStore.begin(trial, recipe.to_dict())
        values, stopped = StudyStore(trial.study).copy_earlier(trial)
        if values is None and stopped is None:
            if self.progress is not None:
                self.progress.start_trial(trial.number, recipe)
            return None
        earlier = StudyStore.record(trial).duplicate_of
        if self.progress is not None and values is not None:
            self.progress.trial_reused(trial.number, earlier)
        elif self.progress is not None:
            self.progress.trial_stopped(trial.number, f"same recipe as trial {earlier}: "
                                                      f"{stopped}")
        return Outcome("repeat", values, stopped)

    def guide_data(self, study: optuna.Study) -> dict[str, Any]:
        """What the study's finished trials can save the next one (see ``guide_data``)."""
        return guide_data(study, self.spec, self.tally.ends_at)

    def finish(self, trial: optuna.Trial, result: TrialResult, where: str = "") -> Outcome:
        """Record the run's result on ``trial`` (before Optuna is told) and show it; a
        measured candidate records its prediction's errors."""
        prediction = StudyStore.record(trial).prediction
        if prediction and (result.ok or result.stopped is not None):  # a gated one too
            result.metrics.update(prediction_errors(prediction, result.metrics))
        values = StudyStore.write_result(trial, self.spec, result)
        if result.stopped is not None:
            outcome = Outcome("stopped", reason=result.stopped)
        elif values is None:
            outcome = Outcome("failed", reason=result.failure)
        else:
            outcome = Outcome("new", values)
        if self.progress is None:
            return outcome
        if outcome.kind == "stopped":
            self.progress.trial_stopped(trial.number, result.stopped, where)
        elif outcome.kind == "failed":
            self.progress.trial_failed(trial.number, result.failure, where)
        else:
            feasible = (result.metrics["quality_drop"]
                        <= self.spec.constraints.max_quality_drop)
            self.progress.trial_done(trial.number, result, feasible, where)
        return outcome

    def count(self, study: optuna.Study, kind: OutcomeKind, done: int | None = None
              ) -> str | None:
        """Count a trial Optuna was told of; return why the run should start no other one
        (see ``RunTally.why_stop``; ``done``: the study's distinct completed trials, read
        from it when not given). After a repeat, the next trial runs an untried recipe
        rather than the sampler's next repeat."""
        self.tally.record(kind)
        done = StudyStore(study).completed_count() if done is None else done
        if (kind == "repeat" and self.tally.why_stop(done) is None
                and not enqueue_untried(study, self.spec)):
            self.tally.exhausted = True
        return self.tally.why_stop(done)


def run_one(flow: TrialFlow, trial: optuna.Trial, recipe: Recipe,
            run: Callable[[Recipe, dict[str, Any]], TrialResult]) -> Outcome:
    """The whole flow in this process, which claims the trial before ``run(recipe,
    guide_data)`` runs an unseen recipe."""
    repeat = flow.propose(trial, recipe)
    if repeat is not None:
        return repeat
    StudyStore.claim(trial, f"{socket.gethostname()}:{os.getpid()}")
    guide = flow.guide_data(trial.study)
    guide["for_promotion"] = bool((StudyStore.record(trial).prediction or {}).get(FOR_PROMOTION))
    return flow.finish(trial, run(recipe, guide))
