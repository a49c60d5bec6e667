"""The local Optuna backend: trials run in this process, one after the other."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from ..spaces import Recipe
from ._candidates import CandidateTier
from ._guide import guide_for
from ._lease import study_lease
from ._loop import TrialFlow, run_one
from ._measuring import measure_baseline
from ._progress import StudyProgress
from ._record import TrialResult
from ._sampling import enqueue_seeds, suggest_recipe
from ._signals import interrupted_by
from ._spec import StudySpec
from ._storage import storage_errors, storage_of
from ._store import StudyStore, settled_note
from ._study import open_study
from ._tally import RunTally
from ._task import Task, load_task
from ._trial import TrialSettings, run_trial

Room = Callable[[optuna.Study, StudyProgress], bool]


class TrialFailed(Exception):
    """Raised inside the objective so Optuna records the trial as failed."""


@dataclass
class Objective:
    """The Optuna objective: one trial's flow (``run_one``) on a recipe the sampler proposes."""

    spec: StudySpec
    task: Task
    settings: TrialSettings
    progress: StudyProgress
    tally: RunTally
    interrupted: KeyboardInterrupt | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.progress.stage("measuring the teacher")
        self.baseline = measure_baseline(self.task)
        self.flow = TrialFlow(self.spec, self.tally, self.progress)
        self.tier = (CandidateTier(self.spec, self.task, self.baseline, self.progress)
                     if self.spec.candidates.count else None)

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        return self.run(trial)

    def run(self, trial: optuna.Trial) -> tuple[float, ...]:
        """The trial's values; an interruption (Ctrl-C, SIGTERM) fails it with the signal's
        name, unless its result was recorded already: it is then told, and the interruption
        raised after (``raise_interruption``)."""
        try:
            return self._run(trial)
        except KeyboardInterrupt as exc:
            values = StudyStore.record(trial).values
            if values is not None:
                self.interrupted = exc
                return values
            StudyStore.note_failure(trial, f"interrupted by {interrupted_by()}")
            raise

    def raise_interruption(self) -> None:
        """Raise the interruption that came after the last trial's result was recorded."""
        if self.interrupted is not None:
            raise self.interrupted

    def _run(self, trial: optuna.Trial) -> tuple[float, ...]:
        outcome = run_one(self.flow, trial, suggest_recipe(trial, self.spec), self._trial)
        if outcome.state == TrialState.PRUNED:
            raise optuna.TrialPruned(outcome.reason)
        if outcome.state == TrialState.FAIL:
            raise TrialFailed(outcome.reason)
        return outcome.values

    def _trial(self, recipe: Recipe, guide: dict) -> TrialResult:
        start = self.tier.start(recipe) if self.tier else None
        settings = self.settings if start is None else self.tier.settings(self.settings)
        return run_trial(self.task, recipe, settings, self.baseline,
                         on_stage=self.progress.stage, on_step=self.progress.fine_tune_step,
                         guide=guide_for(self.spec, guide), start=start)


def run_in_process(spec: StudySpec, *, target: int, storage: str | None, progress: bool,
                   address: str | None = None) -> optuna.Study:
    """Run the study in this process until it holds ``target`` completed trials, holding
    its lease (see ``_lease``): trials a killed earlier process left running are finished
    first (``mark_interrupted``); a study another live run drives raises ParetoslimError."""
    location = storage_of(spec, storage)
    study = open_study(spec, storage)
    with contextlib.ExitStack() as stack:
        with storage_errors(location):
            leased = stack.enter_context(study_lease(study, location))
        if not spec.candidates.count:  # the predicted tier chooses the first trials
            enqueue_seeds(study, spec)
        note = (settled_note(StudyStore(study).mark_interrupted()) if leased
                else unleased_note(study))
        if note and progress:
            print(note)
        with storage_errors(location, writing=True):
            optimize_until(study, spec, target, progress=progress)
    return study


def unleased_note(study: optuna.Study) -> str:
    """What a run without a lease says of the trials it finds running (it leaves them)."""
    running = StudyStore(study).running_unclaimed()
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
    done = StudyStore(study).completed_count()
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
        if run.tier is not None and not run.tier.begin(study, tally.ends_at):
            return
        study.optimize(run, n_trials=None, catch=(TrialFailed,),
                       callbacks=[functools.partial(_after_trial, run=run, room=room)],
                       gc_after_trial=True)
    finally:
        reporter.close()
    why = tally.why_stop(StudyStore(study).completed_count())
    if why:
        reporter.note(why)


def _after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial, *, run: Objective,
                 room: Room | None) -> None:
    run.raise_interruption()  # one that came after the trial's result was recorded
    if run.flow.count(study, StudyStore.outcome(trial)) is not None:
        study.stop()
    elif run.tier is not None and not run.tier.after(study, trial):
        study.stop()
    elif room is not None and not room(study, run.progress):
        study.stop()
