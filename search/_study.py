"""The Optuna backend: storage, samplers, the objective, resuming, and finding a stored study."""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ..spaces import Recipe
from ._errors import ParetoslimError
from ._progress import StudyProgress
from ._spec import StudySpec, WorkerSpec, load_spec
from ._task import Task, load_task
from ._trial import TrialResult, TrialSettings, measure_baseline, run_trial

RECIPE_ATTR = "recipe"
METRICS_ATTR = "metrics"
FAILURE_ATTR = "fail_reason"
SPEC_ATTR = "spec"
DUPLICATE_ATTR = "duplicate_of"
WORKER_ATTR = "worker"
HEARTBEAT_ATTR = "sends_heartbeats"
JOURNAL_LOCK_GRACE_S = 30  # a journal lock kept this long (its writer was killed) is taken over
_URL_SCHEMES = ("sqlite:", "postgresql", "mysql", "oracle", "mssql")


class TrialFailed(Exception):
    """Raised inside the objective so Optuna records the trial as failed."""


def is_rdb_url(location: str) -> bool:
    """Whether ``location`` is an SQLAlchemy database URL (else a journal file path)."""
    return location.startswith(_URL_SCHEMES)


def make_storage(url_or_path: str, workers: WorkerSpec | None = None) -> Any:
    """An Optuna storage: an RDB URL as is, anything else a journal file path.

    With ``workers``, an RDB storage whose running trials send heartbeats; a trial silent
    for the grace period is failed and retried by the next worker that starts a trial.
    """
    if is_rdb_url(url_or_path):
        if workers is None:
            return url_or_path
        from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

        retry = RetryHeartbeatStaleTrialCallback(max_retry=workers.max_retries)
        return RDBStorage(url_or_path, heartbeat_interval=workers.heartbeat_s,
                          grace_period=workers.grace_s, heartbeat_stale_trial_callback=retry,
                          engine_kwargs={"pool_pre_ping": True})
    # absolute: the lock is a symbolic link to the journal, and a relative link would
    # dangle, so a lock left by a killed writer would never be released
    path = Path(url_or_path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    lock = JournalFileSymlinkLock(str(path), grace_period=JOURNAL_LOCK_GRACE_S)
    return JournalStorage(JournalFileBackend(str(path), lock))


def storage_of(spec: StudySpec, override: str | None = None) -> str:
    """The storage a spec's study lives in: ``override``, the spec's, or runs/NAME/journal.log."""
    return override or spec.storage or str(spec.default_storage_path())


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    name, seed = spec.sampler.name, spec.seed
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=spec.sampler.population_size,
                                             seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=seed)


def suggest_recipe(trial: optuna.Trial, spec: StudySpec):
    """Sample the spec's space through an Optuna trial and return the Recipe."""
    from ..spaces import Choice, FloatRange

    params: dict[str, Any] = {}
    for name, domain in spec.space.searched().items():
        if isinstance(domain, FloatRange):
            params[name] = trial.suggest_float(name, domain.low, domain.high, step=domain.step)
        elif isinstance(domain, Choice):
            params[name] = trial.suggest_categorical(name, list(domain.values))
    return spec.space.recipe(params)


def _spec_record(spec: StudySpec) -> dict[str, Any]:
    path = str(spec.path.resolve()) if spec.path is not None else None
    return {"path": path, "name": spec.name, "objectives": list(spec.objectives),
            "max_quality_drop": spec.constraints.max_quality_drop}


def open_study(spec: StudySpec, storage: str | None = None, *,
               workers: WorkerSpec | None = None,
               sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    """Create the spec's study or load it if it exists (same name, same objectives).

    Safe when several processes open a new database study at the same moment: creation is
    serialized (a PostgreSQL advisory lock, else retries), so none crashes on the schema.
    """
    location = storage_of(spec, storage)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are reported by paretoslim
    try:
        study = _create_once(location, lambda: optuna.create_study(
            study_name=spec.name, storage=make_storage(location, workers),
            directions=spec.directions, sampler=sampler or make_sampler(spec), load_if_exists=True,
        ))
    except ValueError as exc:
        raise ParetoslimError(
            f"study {spec.name!r} in {location}: {exc} (the objectives changed? use a new "
            "study name or storage)"
        ) from None
    if study.directions and [d.name.lower() for d in study.directions] != spec.directions:
        raise ParetoslimError(
            f"study {spec.name!r} in {location} was created with other objectives; use a new "
            "study name or storage"
        )
    if SPEC_ATTR not in study.user_attrs:
        study.set_user_attr(SPEC_ATTR, _spec_record(spec))
    return study


_CREATION_LOCK_KEY = 0x70617265746F  # "pareto": the advisory lock serializing creation


def _create_once(location: str, create: Any) -> optuna.Study:
    """Run ``create`` so that concurrent first workers do not race on schema creation."""
    if not is_rdb_url(location):
        return create()  # journal files append under a file lock: no race
    import random
    import time

    import sqlalchemy

    if location.startswith("postgresql"):
        engine = sqlalchemy.create_engine(location, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as connection:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"),
                                   {"key": _CREATION_LOCK_KEY})
                try:
                    return create()
                finally:
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"),
                                       {"key": _CREATION_LOCK_KEY})
        except sqlalchemy.exc.OperationalError as exc:
            raise ParetoslimError(f"cannot reach the storage {_redacted(location)}: "
                                  f"{str(exc.orig).strip().splitlines()[0]}") from None
        finally:
            engine.dispose()
    for attempt in range(6):  # other databases: back off and retry a lost creation race
        try:
            return create()
        except sqlalchemy.exc.SQLAlchemyError:
            if attempt == 5:
                raise
            time.sleep(random.uniform(0.2, 1.0) * (attempt + 1))
    raise AssertionError("unreachable")


def _redacted(url: str) -> str:
    """A database URL without its password."""
    try:
        import sqlalchemy

        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def mark_interrupted(study: optuna.Study) -> int:
    """Record trials left running by a killed process as failed; return how many.

    Trials of ``worker`` processes are left alone: they may still be running, and a
    worker's trial that stops sending heartbeats is failed and retried by the workers.
    """
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(HEARTBEAT_ATTR):
            continue
        study._storage.set_trial_user_attr(
            trial._trial_id, FAILURE_ATTR,
            "interrupted: the process running this trial ended before it finished")
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        count += 1
    return count


def _stored_recipe(data: Any) -> Recipe | None:
    """The Recipe a trial stored (keys added since then take their defaults), or None."""
    try:
        return Recipe.from_dict(data)
    except (TypeError, ValueError):
        return None


def reuse_earlier(trial: optuna.Trial, spec: StudySpec) -> tuple[float, ...] | None:
    """If a completed trial had this trial's recipe, copy its figures here and return its
    values (the pipeline is deterministic); else None. The recipe attribute must be set."""
    recipe = Recipe.from_dict(trial.user_attrs[RECIPE_ATTR])
    for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if (DUPLICATE_ATTR not in other.user_attrs
                and _stored_recipe(other.user_attrs.get(RECIPE_ATTR)) == recipe):
            trial.set_user_attr(METRICS_ATTR, other.user_attrs[METRICS_ATTR])
            trial.set_user_attr(DUPLICATE_ATTR, other.number)
            for key, value in other.system_attrs.items():
                if key.startswith("constraints:"):
                    trial.set_constraint(key.split(":", 1)[1], value)
            return tuple(other.values)
    return None


def record_result(trial: optuna.Trial, spec: StudySpec, result: TrialResult
                  ) -> tuple[float, ...] | None:
    """Store a trial's metrics on the Optuna trial, with its failure reason or its quality
    constraint; return the objective values, or None when the trial failed."""
    trial.set_user_attr(METRICS_ATTR, _json_safe(result.metrics))
    if not result.ok:
        trial.set_user_attr(FAILURE_ATTR, result.failure)
        return None
    drop = result.metrics["quality_drop"]
    trial.set_constraint("max_quality_drop", drop - spec.constraints.max_quality_drop)
    return tuple(result.values[name] for name in spec.objectives)


def is_feasible(spec: StudySpec, result: TrialResult) -> bool:
    return result.metrics["quality_drop"] <= spec.constraints.max_quality_drop


@dataclass
class _Objective:
    spec: StudySpec
    task: Task
    settings: TrialSettings
    progress: StudyProgress
    shared: bool = False

    def __post_init__(self) -> None:
        self.progress.stage("measuring the teacher")
        self.baseline = measure_baseline(self.task)

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        if not self.shared:
            return self._run(trial)
        trial.set_user_attr(HEARTBEAT_ATTR, True)
        # a finished trial cannot be annotated: say now why it fails if this worker dies
        trial.set_user_attr(FAILURE_ATTR, (
            f"lost: worker {socket.gethostname()}:{os.getpid()} stopped sending heartbeats "
            "(killed or disconnected); the recipe is retried"))
        values = self._run(trial)
        trial.set_user_attr(FAILURE_ATTR, "")
        return values

    def _run(self, trial: optuna.Trial) -> tuple[float, ...]:
        recipe = suggest_recipe(trial, self.spec)
        trial.set_user_attr(RECIPE_ATTR, recipe.to_dict())
        earlier = reuse_earlier(trial, self.spec)
        if earlier is not None:
            self.progress.trial_reused(trial.number, trial.user_attrs[DUPLICATE_ATTR])
            return earlier
        trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
        self.progress.start_trial(trial.number, recipe)
        result = run_trial(self.task, recipe, self.settings, self.baseline,
                           on_stage=self.progress.stage)
        values = record_result(trial, self.spec, result)
        if values is None:
            self.progress.trial_failed(trial.number, result.failure)
            raise TrialFailed(result.failure)
        self.progress.trial_done(trial.number, result, is_feasible(self.spec, result))
        return values


def run_study(spec: StudySpec, *, trials: int | None = None, storage: str | None = None,
              progress: bool = True, backend: str | None = None,
              address: str | None = None) -> optuna.Study:
    """Run the study until it holds ``trials`` (default: the spec's) completed trials.

    Resumes a stored study: completed trials are kept and only the missing ones run.
    Failed trials are recorded with their reason and do not count; the run stops after
    ``max(5, trials)`` failures in a row, so a broken task cannot loop forever.
    ``backend`` (default: the spec's) is ``optuna`` (this process) or ``ray`` (Ray Tune,
    on the cluster at ``address``, default the spec's ``ray.address``).
    """
    target = trials if trials is not None else spec.trials
    if target < 1:
        raise ParetoslimError(f"--trials must be >= 1. Got {target}.")
    backend = backend or spec.backend
    if backend == "ray":
        try:
            from ._ray import run_ray_study
        except ImportError as exc:
            raise ParetoslimError(f"the ray backend needs Ray Tune ({exc}): pip install "
                                  "'paretoslim[ray]'") from None

        return run_ray_study(spec, target=target, storage=storage, progress=progress,
                             address=address)
    if backend != "optuna":
        raise ParetoslimError(f"--backend must be one of ['optuna', 'ray']. Got {backend!r}.")
    study = open_study(spec, storage)
    interrupted = mark_interrupted(study)
    if interrupted and progress:
        print(f"{interrupted} trial(s) left running by an earlier process were recorded "
              "as failed")
    optimize_until(study, spec, target, progress=progress)
    return study


def run_worker(spec: StudySpec, storage: str | None = None, *, trials: int | None = None,
               progress: bool = True) -> optuna.Study:
    """Run trials of the spec's study as one of several workers sharing a database storage.

    Start any number of workers, on one or many machines, against the same storage URL
    (``storage``, else the spec's): the first creates the study, all of them sample from it
    and stop when it holds ``trials`` (default: the spec's) completed trials. A worker that
    dies stops sending heartbeats; after ``workers.grace_s`` its trial is failed and its
    recipe retried by another worker.
    """
    location = storage or spec.storage
    if not location or not is_rdb_url(location):
        raise ParetoslimError(
            "a worker needs a database storage shared by all workers, e.g. --storage "
            f"postgresql://USER:PASSWORD@HOST/DB. Got {location or 'none'!r}.")
    target = trials if trials is not None else spec.trials
    if target < 1:
        raise ParetoslimError(f"--trials must be >= 1. Got {target}.")
    import warnings

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study = open_study(spec, location, workers=spec.workers)
    optimize_until(study, spec, target, progress=progress, shared=True)
    return study


def optimize_until(study: optuna.Study, spec: StudySpec, target: int, *, progress: bool,
                   shared: bool = False) -> None:
    """Run trials of ``study`` in this process until it holds ``target`` completed trials.

    ``shared``: other workers run trials of the same study; a worker waits instead of
    starting a trial that would take the study past ``target`` while theirs run.
    """
    done = completed_count(study)
    if done >= target:
        if progress:
            print(f"study {spec.name!r} already has {done} completed trials")
        return
    task = load_task(spec.task, spec.base_dir, spec.task_options)
    reporter = StudyProgress(target=target, completed=done, enabled=progress)
    objective = _Objective(spec, task, TrialSettings.from_spec(spec), reporter, shared)
    failures, max_failures = 0, max(5, target)

    def stop_when_enough(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal failures
        failures = failures + 1 if trial.state == TrialState.FAIL else 0
        if failures >= max_failures or (shared and not _wait_for_room(study, target,
                                                                       reporter)):
            study.stop()
        elif completed_count(study) >= target:
            study.stop()

    try:
        if shared and not _wait_for_room(study, target, reporter):
            return
        study.optimize(objective, n_trials=None, catch=(TrialFailed,),
                       callbacks=[stop_when_enough], gc_after_trial=True)
    finally:
        reporter.close()
    if failures >= max_failures:
        reporter.note(f"stopped after {failures} failed trials in a row; see `paretoslim "
                      f"front {spec.name} --all` for their reasons")


def _wait_for_room(study: optuna.Study, target: int, reporter: StudyProgress,
                   poll_s: float = 2.0) -> bool:
    """Wait while other workers' running trials would reach ``target``; False when the
    study is done. Stale trials of dead workers are failed (and retried) meanwhile."""
    import time

    while True:
        trials = study.get_trials(deepcopy=False,
                                  states=(TrialState.COMPLETE, TrialState.RUNNING))
        done = sum(t.state == TrialState.COMPLETE for t in trials)
        reporter.set_completed(done)
        if done >= target:
            return False
        if len(trials) < target:
            return True
        reporter.stage(f"waiting: {len(trials) - done} trial(s) of other workers running")
        time.sleep(poll_s)
        optuna.storages.fail_stale_trials(study)


def completed_count(study: optuna.Study) -> int:
    """How many trials of ``study`` completed."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def resolve_study(ref: str, storage: str | None = None) -> tuple[optuna.Study, StudySpec | None]:
    """Find a stored study by spec path (``*.toml``) or by name under ``runs/``.

    Returns the study and its spec when the spec file can still be read.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec: StudySpec | None = None
    if ref.endswith(".toml"):
        spec = load_spec(ref)
        name, location = spec.name, storage_of(spec, storage)
    else:
        name = ref
        location = storage or str(Path("runs") / name / "journal.log")
    if not location.startswith(_URL_SCHEMES) and not Path(location).is_file():
        raise ParetoslimError(
            f"no study {name!r}: {location} does not exist (run `paretoslim run SPEC` first, "
            "or pass --storage)"
        )
    try:
        study = optuna.load_study(study_name=name, storage=make_storage(location))
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(make_storage(location))]
        raise ParetoslimError(
            f"no study named {name!r} in {location}; studies there: {names or 'none'}"
        ) from None
    if spec is None:
        record = study.user_attrs.get(SPEC_ATTR, {})
        path = record.get("path")
        if path and os.path.isfile(path):
            spec = load_spec(path)
    return study, spec

