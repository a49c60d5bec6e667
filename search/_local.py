"""The local Optuna backend: trials run in this process, one after the other."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from ._lease import study_lease
from ._progress import StudyProgress
from ._sampling import enqueue_seeds, enqueue_untried, suggest_recipe
from ._signals import interrupted_by
from ._spec import StudySpec
from ._store import (
    DUPLICATE_ATTR,
    FAILURE_ATTR,
    HEARTBEAT_ATTR,
    RECIPE_ATTR,
    VALUES_ATTR,
    WORKER_ATTR,
    completed_count,
    guide_data,
    guide_for,
    is_feasible,
    mark_interrupted,
    open_study,
    outcome_of,
    record_result,
    reuse_earlier,
    settled_note,
    stopped_earlier,
    storage_errors,
    storage_of,
)
from ._tally import RunTally
from ._task import Task, load_task
from ._trial import TrialSettings, measure_baseline, run_trial

Room = Callable[[optuna.Study, StudyProgress], bool]


class TrialFailed(Exception):
    """Raised inside the objective so Optuna records the trial as failed."""


@dataclass
class Objective:
    """The Optuna objective: sample a recipe, reuse a repeated one's figures or run it."""

    spec: StudySpec
    task: Task
    settings: TrialSettings
    progress: StudyProgress
    tally: RunTally
    interrupted: KeyboardInterrupt | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.progress.stage("measuring the teacher")
        self.baseline = measure_baseline(self.task)

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        return self.run(trial)

    def run(self, trial: optuna.Trial) -> tuple[float, ...]:
        """The trial's values; an interruption (Ctrl-C, SIGTERM) fails it with the signal's
        name, unless its result was recorded already: it is then told, and the interruption
        raised after (``raise_interruption``)."""
        try:
            return self._run(trial)
        except KeyboardInterrupt as exc:
            values = trial.user_attrs.get(VALUES_ATTR)
            if values is not None:
                self.interrupted = exc
                return tuple(values)
            trial.set_user_attr(FAILURE_ATTR, f"interrupted by {interrupted_by()}")
            raise

    def raise_interruption(self) -> None:
        """Raise the interruption that came after the last trial's result was recorded."""
        if self.interrupted is not None:
            raise self.interrupted

    def _run(self, trial: optuna.Trial) -> tuple[float, ...]:
        recipe = suggest_recipe(trial, self.spec)
        trial.set_user_attr(RECIPE_ATTR, recipe.to_dict())
        earlier = reuse_earlier(trial, self.spec)
        if earlier is not None:
            self.progress.trial_reused(trial.number, trial.user_attrs[DUPLICATE_ATTR])
            return earlier
        stopped = stopped_earlier(trial)
        if stopped is not None:
            self.progress.trial_stopped(trial.number, f"same recipe as trial "
                                        f"{trial.user_attrs[DUPLICATE_ATTR]}: {stopped}")
            raise optuna.TrialPruned(stopped)
        trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
        self.progress.start_trial(trial.number, recipe)
        result = run_trial(self.task, recipe, self.settings, self.baseline,
                           on_stage=self.progress.stage, on_step=self.progress.fine_tune_step,
                           guide=guide_for(self.spec, guide_data(trial.study, self.spec,
                                                                 self.tally.ends_at)))
        values = record_result(trial, self.spec, result)
        if result.stopped is not None:
            self.progress.trial_stopped(trial.number, result.stopped)
            raise optuna.TrialPruned(result.stopped)
        if values is None:
            self.progress.trial_failed(trial.number, result.failure)
            raise TrialFailed(result.failure)
        self.progress.trial_done(trial.number, result, is_feasible(self.spec, result))
        return values


def run_local(spec: StudySpec, *, target: int, storage: str | None, progress: bool,
              address: str | None = None) -> optuna.Study:
    """Run the study in this process until it holds ``target`` completed trials, holding
    its lease (see ``_lease``): trials a killed earlier process left running are finished
    first (``mark_interrupted``); a study another live run drives raises ParetoslimError."""
    location = storage_of(spec, storage)
    study = open_study(spec, storage)
    with contextlib.ExitStack() as stack:
        with storage_errors(location):
            leased = stack.enter_context(study_lease(study, location))
        enqueue_seeds(study, spec)
        note = settled_note(mark_interrupted(study)) if leased else unleased_note(study)
        if note and progress:
            print(note)
        with storage_errors(location, writing=True):
            optimize_until(study, spec, target, progress=progress)
    return study


def unleased_note(study: optuna.Study) -> str:
    """What a run without a lease says of the trials it finds running (it leaves them)."""
    running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if not t.user_attrs.get(HEARTBEAT_ATTR)]
    if not running:
        return ""
    return (f"{len(running)} trial(s) found running are left as they are: this storage "
            "offers no lease to tell a live run from a dead one")


def optimize_until(study: optuna.Study, spec: StudySpec, target: int, *, progress: bool,
                   objective: type[Objective] = Objective, room: Room | None = None) -> None:
    """Run trials of ``study`` in this process until it holds ``target`` distinct completed
    trials, until the run has lasted the spec's ``time_budget_s`` from its first trial (no
    trial starts after it; the one running then finishes; loading the task and timing the
    teacher come first and do not count), or until trials in a row complete nothing new
    (see ``RunTally``).

    ``room(study, progress)``, called before the first trial and after each one, says
    whether to start another (False ends the run), e.g. while other workers' trials run.
    """
    done = completed_count(study)
    if done >= target:
        if progress:
            print(f"study {spec.name!r} already has {done} completed trials")
        return
    reporter = StudyProgress(target=target, completed=done, enabled=progress)
    tally = RunTally(target, spec.time_budget_s, spec.name)
    try:
        task = load_task(spec.task, spec.base_dir, spec.task_options)
        run = objective(spec, task, TrialSettings.from_spec(spec), reporter, tally)
        if room is not None and not room(study, reporter):
            return
        tally.start_clock()
        study.optimize(run, n_trials=None, catch=(TrialFailed,),
                       callbacks=[functools.partial(_after_trial, run=run, room=room)],
                       gc_after_trial=True)
    finally:
        reporter.close()
    why = tally.why_stop(completed_count(study))
    if why:
        reporter.note(why)


def _after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial, *, run: Objective,
                 room: Room | None) -> None:
    run.raise_interruption()  # one that came after the trial's result was recorded
    outcome = outcome_of(trial)
    run.tally.record(outcome)
    done = completed_count(study)
    # the sampler proposed a recipe already run: the next trial runs an untried one
    if (outcome == "repeat" and run.tally.why_stop(done) is None
            and not enqueue_untried(study, run.spec)):
        run.tally.exhausted = True
    if run.tally.why_stop(done) is not None:
        study.stop()
    elif room is not None and not room(study, run.progress):
        study.stop()
