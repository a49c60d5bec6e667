"""The Ray Tune backend: the same trials on a Ray cluster, proposed by the study's Optuna sampler.

The driver holds the Optuna study (same storage as the local backend, so every other verb
reads Ray runs alike); Tune runs the trials on the cluster's nodes, and the latency of each
candidate can be measured on a node of the target hardware while training runs anywhere.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import pickle
import signal
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from ._errors import ParetoslimError
from ._guide import guide_for
from ._lease import study_lease
from ._loop import Outcome, TrialFlow
from ._measuring import measure_baseline
from ._private import is_finished, trial_by_number
from ._progress import StudyProgress
from ._record import TrialResult, json_safe
from ._sampling import enqueue_seeds, make_sampler, suggest_recipe
from ._signals import Interrupted, last_signal
from ._spec import StudySpec
from ._storage import storage_errors, storage_of
from ._store import StudyStore, settled_note
from ._study import open_study
from ._tally import RunTally, fruitless_limit
from ._task import load_task
from ._trial import TrialSettings, run_trial

RESULT_KEY = "paretoslim"
FINISHED_MARK = ".paretoslim-finished"
_driver: dict[str, Any] = {}  # the driver's progress display, read by the searcher


def run_ray_study(spec: StudySpec, *, target: int, storage: str | None = None,
                  progress: bool = True, address: str | None = None) -> optuna.Study:
    """Run the study with Ray Tune until it holds ``target`` completed trials, holding the
    study's lease (see ``_lease``) in this driver.

    An interrupted run (killed driver, Ctrl-C) is resumed with ``Tuner.restore`` from the
    spec's ``ray.results`` path: completed trials are kept, unfinished ones run again.
    """
    spec = _absolute(spec)
    location = storage_of(spec, storage)
    study = open_study(spec, storage)
    with contextlib.ExitStack() as stack:
        with storage_errors(location):
            leased = stack.enter_context(study_lease(study, location))
        with storage_errors(location, writing=True):
            return _drive(spec, study, target, location, progress, address, leased)


def _drive(spec: StudySpec, study: optuna.Study, target: int, location: str, progress: bool,
           address: str | None, leased: bool) -> optuna.Study:
    enqueue_seeds(study, spec)
    StudyStore(study).write_target(target)
    done = StudyStore(study).completed_count()
    if done >= target:
        if progress:
            print(f"study {spec.name!r} already has {done} completed trials")
        return study

    # the teacher is trained (or loaded) before the time budget starts, as in a local run
    measure_baseline(load_task(spec.task, spec.base_dir, spec.task_options))
    _connect(spec.ray.address if address is None else address)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # state saved within a second
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own tables stay quiet
    reporter = StudyProgress(target=target, completed=done, enabled=progress)
    _driver["progress"] = reporter
    finished = results_dir(spec) / FINISHED_MARK
    try:
        _tuner(spec, study, location, target, reporter, progress, leased).fit()
        why = _driver.get("why_stop")  # set by the searcher when it finished the run
    finally:
        reporter.close()
        _driver.clear()
    study = open_study(spec, location)
    if why is None and StudyStore(study).completed_count() < target:
        raise Interrupted(last_signal() or signal.SIGINT)  # Tune ended early: Ctrl-C, SIGTERM
    finished.parent.mkdir(parents=True, exist_ok=True)
    finished.touch()
    if why:
        reporter.note(why)
    return study


def _tuner(spec: StudySpec, study: optuna.Study, location: str, target: int,
           reporter: StudyProgress, progress: bool, leased: bool) -> tune.Tuner:
    """The experiment to run: the unfinished one restored, else a new one."""
    experiment = results_dir(spec)
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, spec=spec),
        {"cpu": spec.ray.cpu, "gpu": spec.ray.gpu})
    finished = experiment / FINISHED_MARK
    if tune.Tuner.can_restore(str(experiment)) and not finished.exists():
        if progress:
            reporter.note(f"resuming the Ray Tune experiment in {experiment}")
        return tune.Tuner.restore(str(experiment), trainable=trainable,
                                  resume_unfinished=True, resume_errored=False,
                                  restart_errored=False)
    finished.unlink(missing_ok=True)
    note = settled_note(StudyStore(study).mark_interrupted()) if leased else ""
    if note and progress:
        reporter.note(note)
    searcher = StudySearch(spec, location, max_failures=fruitless_limit(target), settle=leased)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, num_samples=-1, reuse_actors=True,
            max_concurrent_trials=spec.ray.max_concurrent_trials,
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=str(spec.ray_results_path()), verbose=0,
            failure_config=tune.FailureConfig(max_failures=1),
            callbacks=[FollowExperiment()]),
    )


def _trial_name(trial) -> str:
    return f"trial_{trial.config.get('number', trial.trial_id)}"


def _absolute(spec: StudySpec) -> StudySpec:
    """The spec with its file path made absolute: trials load the task on other nodes."""
    from dataclasses import replace

    return replace(spec, path=spec.path.resolve()) if spec.path is not None else spec


def _connect(address: str) -> None:
    if ray.is_initialized():
        return
    # the task is loaded relative to the spec, not to a trial's directory
    env = {"RAY_CHDIR_TO_TRIAL_DIR": "0"}
    try:
        ray.init(address=address or None, runtime_env={"env_vars": env},
                 logging_level=logging.WARNING, log_to_driver=False,
                 configure_logging=True)
    except ConnectionError as exc:
        raise ParetoslimError(f"cannot connect to the Ray cluster at {address!r}: {exc}. "
                              "Start one with `ray start --head` (see README, Running on a "
                              "cluster) or leave ray.address empty for a local one") from None
    logging.getLogger("ray.tune").setLevel(logging.ERROR)


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
        return TrialFlow(self._spec, self._tally, _driver.get("progress"))

    def suggest(self, trial_id: str) -> dict | str | None:
        study = self.study
        while True:
            why = self._tally.why_stop(self._done)
            if why is not None:
                _driver["why_stop"] = why
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
                        "guide": self._flow().guide(study)}
            self._tell(study, trial, repeat)
            self.forget(trial_id)

    def _tell(self, study: optuna.Study, trial: optuna.Trial, outcome: Outcome) -> None:
        study.tell(trial, outcome.values, state=outcome.state)
        self._flow().count(study, outcome.kind)
        self._done += outcome.kind == "new"

    def _show_running(self) -> None:
        progress = _driver.get("progress")
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
        _driver["restored_searcher"] = self


class FollowExperiment(tune.Callback):
    """Before the first step of a restored experiment, gives the restored searcher the
    trials the experiment will still run (see ``StudySearch.follow_experiment``)."""

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        searcher = _driver.pop("restored_searcher", None)
        if searcher is not None:
            searcher.follow_experiment({t.trial_id: t.config for t in trials
                                        if not t.is_finished() and "number" in t.config})


def _where(metrics: dict) -> str:
    trained, timed = metrics.get("trained_on_node"), metrics.get("measured_on_node")
    if not trained:
        return ""
    return f"  (on {trained}" + (f", timed on {timed})" if timed and timed != trained else ")")


# --- inside the trial actors ---------------------------------------------------------------

_loaded: dict[tuple, tuple] = {}  # per actor process: the task and its baseline, loaded once


def _trainable(config: dict, spec: StudySpec) -> None:
    key = (str(spec.path), spec.task, json.dumps(spec.task_options, sort_keys=True,
                                                 default=str))
    if key not in _loaded:
        task = load_task(spec.task, spec.base_dir, spec.task_options)
        _loaded[key] = (task, measure_baseline(task))
    task, baseline = _loaded[key]
    recipe = spec.space.recipe(config["params"])
    settings = TrialSettings.from_spec(spec)
    measure = TargetMeasure(spec, settings) if spec.ray.time_on_target else None
    if measure is not None and not measure.resource_available():
        measure = None  # no node of the target: measure where the trial runs
    result = run_trial(task, recipe, settings, baseline, measure=measure,
                       guide=guide_for(spec, config.get("guide")))
    node = ray.util.get_node_ip_address()
    metrics = dict(result.metrics)
    metrics["trained_on_node"] = node
    metrics["trained_in_process"] = os.getpid()  # the same for trials of a reused actor
    if result.ok:
        metrics["measured_on_node"] = measure.node if measure and measure.node else node
        metrics["measured_on_target"] = bool(measure and measure.node)
    values = {name: result.values.get(name, math.nan) for name in spec.objectives}
    payload = {"values": json_safe(values), "metrics": json_safe(metrics),
               "failure": result.failure, "stopped": result.stopped}
    tune.report({**values, RESULT_KEY: json.dumps(payload)})


class TargetMeasure:
    """Runs a latency job as a Ray task on a node holding the resource ``target:TARGET``.

    One unit of that resource per node means one measurement per node at a time; each job
    runs in a fresh worker process (``max_calls=1``) that has run no other model.
    """

    def __init__(self, spec: StudySpec, settings: TrialSettings):
        self.resource = f"target:{spec.latency.target}"
        self.timeout_s = settings.finetune.trial_timeout_s
        self.node: str | None = None

    def resource_available(self) -> bool:
        """Whether a live node of the cluster holds the target resource."""
        return any(node.get("Alive") and node.get("Resources", {}).get(self.resource)
                   for node in ray.nodes())

    def __call__(self, job):
        # DEFAULT: not inside the trial's placement group, which holds no target resource
        remote = ray.remote(num_cpus=0, resources={self.resource: 1}, max_calls=1,
                            max_retries=0, scheduling_strategy="DEFAULT")(_measure_here)
        ref = remote.remote(job)
        try:
            report, self.node = ray.get(ref, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            raise TimeoutError(f"the latency measurement on a {self.resource} node took "
                               f"longer than {self.timeout_s:.0f} s") from None
        except ray.exceptions.RayTaskError as exc:
            raise exc.as_instanceof_cause() from None
        return report


def _measure_here(job):
    from ..evaluators import run_latency_job

    return run_latency_job(job), ray.util.get_node_ip_address()


def results_dir(spec: StudySpec) -> Path:
    """Where Tune writes the study's experiment (trial logs, results, state)."""
    return spec.ray_results_path() / spec.name
