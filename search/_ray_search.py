"""The Ray driver's searcher: Optuna's sampler proposing Tune's trials on the study itself, each
one taken through the shared trial flow (``_loop``) as Tune starts and finishes it."""

from __future__ import annotations

import functools
import json
import math
import pickle
from pathlib import Path
from typing import Any

import optuna
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from ._loop import Outcome, TrialFlow
from ._private import is_finished, trial_by_number
from ._ray_trial import RESULT_KEY
from ._record import TrialResult
from ._sampling import make_sampler, suggest_recipe
from ._spec import StudySpec
from ._store import StudyStore
from ._study import open_study
from ._tally import RunTally

driver: dict[str, Any] = {}  # the driver's progress display and outcome, shared with it


def _sample(spec: StudySpec, trial) -> None:
    suggest_recipe(trial, spec)


class _OptunaSearchOnStudy(OptunaSearch):
    """``OptunaSearch`` on a study that a subclass opens (``open_on``) and takes up
    (``attached``), the trials it ties to Tune's behind ``ask``, ``adopt`` and ``forget``.

    The only code touching ``OptunaSearch``'s private members (``_setup_study``,
    ``_ot_study``, ``_ot_trials``, ``_sampler``, ``_mode``, ``_storage``), checked against
    ray 2.60.0.
    """

    def open_on(self, sampler: optuna.samplers.BaseSampler | None) -> optuna.Study:
        raise NotImplementedError

    def attached(self, study: optuna.Study) -> None:
        """Called with the study each time it is (re)opened."""

    def _setup_study(self, mode) -> None:  # where OptunaSearch creates its study
        self._ot_study = self.open_on(self._sampler)
        self.attached(self._ot_study)

    @property
    def study(self) -> optuna.Study:
        if self._ot_study is None:
            self._setup_study(self._mode)
        return self._ot_study

    def reopen(self) -> None:
        """Open the study again if it is open, so that ``attached`` runs again."""
        if self._ot_study is not None:
            self._setup_study(self._mode)

    def ask(self, trial_id: str) -> tuple[dict, optuna.Trial]:
        """Tune trial ``trial_id``'s parameters, sampled by a new Optuna trial, and that."""
        params = OptunaSearch.suggest(self, trial_id)
        return params, self._ot_trials[trial_id]

    def adopt(self, trial_id: str, trial: optuna.Trial) -> None:
        """Tie Tune trial ``trial_id`` to ``trial``."""
        self._ot_trials[trial_id] = trial

    def forget(self, trial_id: str) -> None:
        self._ot_trials.pop(trial_id, None)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_ot_study=None, _ot_trials={}, _storage=None)
        return state


class StudySearch(_OptunaSearchOnStudy):
    """``OptunaSearch`` on the study's storage, with its sampler and objectives, that
    records each trial's recipe, metrics, failure reason and quality constraint, reuses
    the figures of a repeated recipe, runs no recipe stopped before, and finishes as
    ``RunTally`` says (``max_failures`` trials in a row completing nothing new)."""

    _max_concurrent: float = math.inf  # Tune's max_concurrent_trials, once it is set
    _tally: RunTally | None = None  # this run's, from its first suggestion
    _settle: bool = True  # the driver holds the study's lease (older checkpoints: it did)

    def __init__(self, spec: StudySpec, location: str, max_failures: int,
                 settle: bool = True):
        self._spec, self._location, self._max_failures = spec, location, max_failures
        self._settle = settle
        self._running: dict[str, optuna.Trial] = {}
        self._recipes: dict[str, Any] = {}
        self._numbers: dict[str, int] = {}
        self._done = self._target = 0
        super().__init__(
            space=functools.partial(_sample, spec), metric=list(spec.objectives),
            mode=["max" if d == "maximize" else "min" for d in spec.directions],
            sampler=make_sampler(spec), study_name=spec.name)

    def open_on(self, sampler: optuna.samplers.BaseSampler | None) -> optuna.Study:
        return open_study(self._spec, self._location, sampler=sampler)

    def attached(self, study: optuna.Study) -> None:
        store = StudyStore(study)
        self._target = store.target(self._spec.trials)
        self._done = store.completed_count()
        self._tally = RunTally(self._target, self._spec.time_budget_s, self._spec.name,
                               limit=self._max_failures)  # this run's
        self._tally.start_clock()
        self._running = {}
        for trial_id, number in self._numbers.items():  # restored from a checkpoint
            self._running[trial_id] = trial_by_number(study, number)
            self.adopt(trial_id, self._running[trial_id])
        # an Optuna trial the restored experiment does not know of will never finish
        known = set(self._numbers.values())
        for trial in store.running_unclaimed():
            if self._settle and trial.number not in known:
                store.settle_running(trial, "interrupted: the Ray driver ended before its "
                                            "experiment state held this trial")

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """Limit the running trials here, where a restore can correct the count."""
        self._max_concurrent = max_concurrent
        return True

    def follow_experiment(self, unfinished: dict[str, dict]) -> None:
        """Count as running exactly the trials a restored experiment will run:
        ``unfinished`` maps each one's Tune trial id to its config. Tune saves its trials
        and this searcher one after the other, so a driver killed in between leaves them
        apart: a trial counted here that Tune never runs would hold its place (and the
        study's end) forever, one that Tune runs unknown here would run for nothing."""
        self._numbers = {tid: config["number"] for tid, config in unfinished.items()}
        self._recipes = {tid: self._spec.space.recipe(config["params"])
                         for tid, config in unfinished.items()}
        self.reopen()

    def _flow(self) -> TrialFlow:
        return TrialFlow(self._spec, self._tally, driver.get("progress"))

    def suggest(self, trial_id: str) -> dict | str | None:
        study = self.study
        while True:
            why = self._tally.why_stop(self._done)
            if why is not None:
                driver["why_stop"] = why
                return Searcher.FINISHED
            if (self._done + len(self._running) >= self._target
                    or len(self._running) >= self._max_concurrent):
                return None  # enough running: wait for them
            params, trial = self.ask(trial_id)
            recipe = self._spec.space.recipe(params)
            repeat = self._flow().propose(trial, recipe)
            if repeat is None:
                self._running[trial_id] = trial
                self._numbers[trial_id] = trial.number
                self._recipes[trial_id] = recipe
                self._show_running()
                return {"params": params, "number": trial.number,
                        "guide": self._flow().guide_data(study)}
            self._tell(study, trial, repeat)
            self.forget(trial_id)

    def _tell(self, study: optuna.Study, trial: optuna.Trial, outcome: Outcome) -> None:
        study.tell(trial, outcome.values, state=outcome.state)
        if outcome.kind == "new":
            self._done += 1
        self._flow().count(study, outcome.kind, self._done)

    def _show_running(self) -> None:
        progress = driver.get("progress")
        if progress is not None:
            progress.stage(f"({len(self._running)} running)")

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass  # one result per trial, handled on completion

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        study = self.study
        trial = self._running.pop(trial_id, None)
        self.forget(trial_id)
        self._numbers.pop(trial_id, None)
        recipe = self._recipes.pop(trial_id, None)
        if trial is None or is_finished(trial):  # finished: re-run after a restore
            return
        reported = self._outcome(recipe, result)
        self._tell(study, trial, self._flow().finish(trial, reported, _where(reported.metrics)))
        self._show_running()

    def _outcome(self, recipe: Any, result: dict | None) -> TrialResult:
        """The trial's result as its trainable reported it, or why there is none."""
        payload = json.loads(result[RESULT_KEY]) if result and RESULT_KEY in result else None
        if payload is None:
            failure = ("the Ray trial errored or was stopped; its log is in "
                       f"{results_dir(self._spec)}")
            return TrialResult(recipe, failure=failure)
        values = {k: v for k, v in payload["values"].items()
                  if v is not None and math.isfinite(v)}
        return TrialResult(recipe, values, payload["metrics"], payload["failure"],
                           payload.get("stopped"))

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update(_running={})
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__getstate__(), handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            self.__dict__.update(pickle.load(handle))
        driver["restored_searcher"] = self


class FollowExperiment(tune.Callback):
    """Before the first step of a restored experiment, gives the restored searcher the
    trials the experiment will still run (see ``StudySearch.follow_experiment``)."""

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        searcher = driver.pop("restored_searcher", None)
        if searcher is not None:
            searcher.follow_experiment({t.trial_id: t.config for t in trials
                                        if not t.is_finished() and "number" in t.config})


def _where(metrics: dict) -> str:
    trained, timed = metrics.get("trained_on_node"), metrics.get("measured_on_node")
    if not trained:
        return ""
    return f"  (on {trained}" + (f", timed on {timed})" if timed and timed != trained else ")")


def results_dir(spec: StudySpec) -> Path:
    """Where Tune writes the study's experiment (trial logs, results, state)."""
    return spec.ray_results_path() / spec.name
