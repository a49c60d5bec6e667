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
from ._store import DUPLICATE_ATTR, FAILURE_ATTR, HEARTBEAT_ATTR, open_study, storage_errors


class SharedObjective(Objective):
    """The objective of a worker: its trials send heartbeats and say why they would fail."""

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        trial.set_user_attr(HEARTBEAT_ATTR, True)
        # a finished trial cannot be annotated: say now why it fails if this worker dies
        trial.set_user_attr(FAILURE_ATTR, (
            f"lost: worker {socket.gethostname()}:{os.getpid()} stopped sending heartbeats "
            "(killed or disconnected); the recipe is retried"))
        values = self.run(trial)
        trial.set_user_attr(FAILURE_ATTR, "")
        return values


def run_shared(spec: StudySpec, *, target: int, storage: str | None, progress: bool,
               address: str | None = None) -> optuna.Study:
    """Run trials of the study in the database ``storage`` until it holds ``target``
    completed trials, counting those of the other workers."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study = open_study(spec, storage, workers=spec.workers)
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
        trials = study.get_trials(deepcopy=False,
                                  states=(TrialState.COMPLETE, TrialState.RUNNING))
        done = sum(t.state == TrialState.COMPLETE and DUPLICATE_ATTR not in t.user_attrs
                   for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        reporter.set_completed(done)
        if done >= target:
            return False
        if done + running < target:
            return True
        reporter.stage(f"waiting: {running} trial(s) of other workers running")
        time.sleep(poll_s)
        optuna.storages.fail_stale_trials(study)
