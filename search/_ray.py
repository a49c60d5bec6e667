"""The Ray Tune backend: the same trials on a Ray cluster, proposed by the study's Optuna sampler.

The driver holds the Optuna study (same storage as the local backend, so every other verb
reads Ray runs alike); Tune runs the trials on the cluster's nodes, and the latency of each
candidate can be measured on a node of the target hardware while training runs anywhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal

import optuna
import ray
from ray import tune

from ._errors import ParetoslimError
from ._lease import study_lease
from ._measuring import measure_baseline
from ._progress import StudyProgress
from ._ray_search import FollowExperiment, StudySearch, driver, results_dir
from ._ray_trial import trainable
from ._sampling import enqueue_seeds
from ._signals import Interrupted, last_signal
from ._spec import StudySpec
from ._storage import storage_errors, storage_of
from ._store import StudyStore, settled_note
from ._study import open_study
from ._tally import fruitless_limit
from ._task import load_task

FINISHED_MARK = ".paretoslim-finished"


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
    driver["progress"] = reporter
    finished = results_dir(spec) / FINISHED_MARK
    try:
        _tuner(spec, study, location, target, reporter, progress, leased).fit()
        why = driver.get("why_stop")  # set by the searcher when it finished the run
    finally:
        reporter.close()
        driver.clear()
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
    actor = tune.with_resources(
        tune.with_parameters(trainable, spec=spec),
        {"cpu": spec.ray.cpu, "gpu": spec.ray.gpu})
    finished = experiment / FINISHED_MARK
    if tune.Tuner.can_restore(str(experiment)) and not finished.exists():
        if progress:
            reporter.note(f"resuming the Ray Tune experiment in {experiment}")
        return tune.Tuner.restore(str(experiment), trainable=actor,
                                  resume_unfinished=True, resume_errored=False,
                                  restart_errored=False)
    finished.unlink(missing_ok=True)
    note = settled_note(StudyStore(study).mark_interrupted()) if leased else ""
    if note and progress:
        reporter.note(note)
    searcher = StudySearch(spec, location, max_failures=fruitless_limit(target), settle=leased)
    return tune.Tuner(
        actor,
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



