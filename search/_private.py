"""The Optuna internals paretoslim relies on, used here and nowhere else.

Checked against optuna 5.1.0: ``Study._storage``, ``Study._study_id``, the ``_trial_id`` of
``Trial`` and ``FrozenTrial``, and ``optuna._hypervolume.compute_hypervolume``. Optuna has
no public way to annotate and finish (fail, complete or prune) a trial that another (dead)
process asked for, nor to take up a running trial by its number, nor an exported
hypervolume function.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState


def fail_trial(study: optuna.Study, trial: FrozenTrial, key: str, reason: str) -> None:
    """Record the running ``trial`` as failed, with ``reason`` in its user attribute ``key``."""
    storage = study._storage
    storage.set_trial_user_attr(trial._trial_id, key, reason)
    storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def finish_trial(study: optuna.Study, trial: FrozenTrial, state: TrialState,
                 values: list[float] | None = None) -> None:
    """Finish the running ``trial`` (asked by another, dead process) in ``state``."""
    study._storage.set_trial_state_values(trial._trial_id, state, values)


def trial_by_number(study: optuna.Study, number: int) -> optuna.Trial:
    """Trial ``number`` of ``study`` as a live trial, to be told by this process."""
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    return optuna.Trial(study, trial_id)


def is_finished(trial: optuna.Trial) -> bool:
    """Whether the storage holds ``trial`` as finished (e.g. told before a restore)."""
    return trial.study._storage.get_trial(trial._trial_id).state.is_finished()


def storage_of_study(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage object ``study`` lives in (another study can be opened beside it)."""
    return study._storage


def compute_hypervolume(points: Any, reference: Any) -> float:
    """Optuna's exact WFG hypervolume (the one its hypervolume plot uses); all minimized."""
    from optuna._hypervolume import compute_hypervolume

    return float(compute_hypervolume(points, reference))
