"""The worker backend: one of many processes running trials of a study in a shared database."""

from __future__ import annotations

import functools
import os
import socket
import time
import warnings

import optuna
from optuna.trial import TrialState

from ._local import Objective, optimize_until
from ._progress import StudyProgress
from ._sampling import enqueue_seeds
from ._spec import StudySpec
from ._storage import storage_errors
from ._store import StudyStore
from ._study import open_study


class SharedObjective(Objective):
    """The objective of a worker: its trials send heartbeats and say why they would fail."""

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        # a finished trial cannot be annotated: say now why it fails if this worker dies
        StudyStore.expect_heartbeats(trial, (
            f"lost: worker {socket.gethostname()}:{os.getpid()} stopped sending heartbeats "
            "(killed or disconnected); the recipe is retried"))
        values = self.run(trial)
        StudyStore.clear_lost(trial)
        return values


def run_shared(spec: StudySpec, *, target: int, storage: str | None, progress: bool,
               address: str | None = None) -> optuna.Study:
    """Run trials of the study in the database ``storage`` until it holds ``target``
    completed trials, counting those of the other workers."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study = open_study(spec, storage, workers=spec.workers)
    if not spec.candidates.count:  # the predicted tier chooses the first trials
        enqueue_seeds(study, spec)
    with storage_errors(storage, writing=True):
        optimize_until(study, spec, target, progress=progress, objective=SharedObjective,
                       room=functools.partial(wait_for_room, target=target))
    return study


def wait_for_room(study: optuna.Study, reporter: StudyProgress, *, target: int,
                  poll_s: float = 2.0) -> bool:
    """Wait while other workers' running trials would reach ``target``; False when the
    study is done. Stale trials of dead workers are failed (and retried) meanwhile."""
    while True:
        trials = StudyStore(study).trials(TrialState.COMPLETE, TrialState.RUNNING)
        done = sum(t.state == TrialState.COMPLETE and r.duplicate_of is None
                   for t, r in trials)
        running = sum(t.state == TrialState.RUNNING for t, _ in trials)
        reporter.set_completed(done)
        if done >= target:
            return False
        if done + running < target:
            return True
        reporter.stage(f"waiting: {running} trial(s) of other workers running")
        time.sleep(poll_s)
        optuna.storages.fail_stale_trials(study)
