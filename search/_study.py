"""The Optuna backend: storage, samplers, the objective, resuming, and finding a stored study."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ._errors import ParetoslimError
from ._progress import StudyProgress
from ._spec import StudySpec, load_spec
from ._task import Task, load_task
from ._trial import TrialResult, TrialSettings, measure_baseline, run_trial

RECIPE_ATTR = "recipe"
METRICS_ATTR = "metrics"
FAILURE_ATTR = "fail_reason"
SPEC_ATTR = "spec"
DUPLICATE_ATTR = "duplicate_of"
_URL_SCHEMES = ("sqlite:", "postgresql", "mysql", "oracle", "mssql")


class TrialFailed(Exception):
    """Raised inside the objective so Optuna records the trial as failed."""


def make_storage(url_or_path: str) -> Any:
    """An Optuna storage: an RDB URL as is, anything else a journal file path."""
    if url_or_path.startswith(_URL_SCHEMES):
        return url_or_path
    path = Path(url_or_path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


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


def open_study(spec: StudySpec, storage: str | None = None) -> optuna.Study:
    """Create the spec's study or load it if it exists (same name, same objectives)."""
    location = storage_of(spec, storage)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are reported by paretoslim
    try:
        study = optuna.create_study(
            study_name=spec.name, storage=make_storage(location),
            directions=spec.directions, sampler=make_sampler(spec), load_if_exists=True,
        )
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


def mark_interrupted(study: optuna.Study) -> int:
    """Record trials left running by a killed process as failed; return how many."""
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(
            trial._trial_id, FAILURE_ATTR,
            "interrupted: the process running this trial ended before it finished")
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        count += 1
    return count


@dataclass
class _Objective:
    spec: StudySpec
    task: Task
    settings: TrialSettings
    progress: StudyProgress

    def __post_init__(self) -> None:
        self.progress.stage("measuring the teacher")
        self.baseline = measure_baseline(self.task)

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        recipe = suggest_recipe(trial, self.spec)
        trial.set_user_attr(RECIPE_ATTR, recipe.to_dict())
        earlier = self._same_recipe(trial, recipe.to_dict())
        if earlier is not None:  # the pipeline is deterministic: reuse what was measured
            trial.set_user_attr(METRICS_ATTR, earlier.user_attrs[METRICS_ATTR])
            trial.set_user_attr(DUPLICATE_ATTR, earlier.number)
            for key, value in earlier.system_attrs.items():
                if key.startswith("constraints:"):
                    trial.set_constraint(key.split(":", 1)[1], value)
            self.progress.note(f"trial {trial.number:>3}  same recipe as trial "
                               f"{earlier.number}, its figures reused")
            self.progress.bar.update(1)
            return tuple(earlier.values)
        self.progress.start_trial(trial.number, recipe)
        result = run_trial(self.task, recipe, self.settings, self.baseline,
                           on_stage=self.progress.stage)
        trial.set_user_attr(METRICS_ATTR, _json_safe(result.metrics))
        if not result.ok:
            trial.set_user_attr(FAILURE_ATTR, result.failure)
            self.progress.trial_failed(trial.number, result.failure)
            raise TrialFailed(result.failure)
        drop = result.metrics["quality_drop"]
        trial.set_constraint("max_quality_drop", drop - self.spec.constraints.max_quality_drop)
        self.progress.trial_done(trial.number, result, self._feasible(result))
        return tuple(result.values[name] for name in self.spec.objectives)

    @staticmethod
    def _same_recipe(trial: optuna.Trial, recipe: dict) -> optuna.trial.FrozenTrial | None:
        for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if (other.user_attrs.get(RECIPE_ATTR) == recipe
                    and DUPLICATE_ATTR not in other.user_attrs):
                return other
        return None

    def _feasible(self, result: TrialResult) -> bool:
        return result.metrics["quality_drop"] <= self.spec.constraints.max_quality_drop


def run_study(spec: StudySpec, *, trials: int | None = None, storage: str | None = None,
              progress: bool = True) -> optuna.Study:
    """Run the study until it holds ``trials`` (default: the spec's) completed trials.

    Resumes a stored study: completed trials are kept and only the missing ones run.
    Failed trials are recorded with their reason and do not count; the run stops after
    ``max(5, trials)`` failures in a row, so a broken task cannot loop forever.
    """
    target = trials if trials is not None else spec.trials
    if target < 1:
        raise ParetoslimError(f"--trials must be >= 1. Got {target}.")
    study = open_study(spec, storage)
    interrupted = mark_interrupted(study)
    done = _completed(study)
    if interrupted and progress:
        print(f"{interrupted} trial(s) left running by an earlier process were recorded "
              "as failed")
    if done >= target:
        if progress:
            print(f"study {spec.name!r} already has {done} completed trials")
        return study
    task = load_task(spec.task, spec.base_dir, spec.task_options)
    reporter = StudyProgress(target=target, completed=done, enabled=progress)
    objective = _Objective(spec, task, TrialSettings.from_spec(spec), reporter)
    failures, max_failures = 0, max(5, target)

    def stop_when_enough(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal failures
        failures = failures + 1 if trial.state == TrialState.FAIL else 0
        if _completed(study) >= target or failures >= max_failures:
            study.stop()

    try:
        study.optimize(objective, n_trials=None, catch=(TrialFailed,),
                       callbacks=[stop_when_enough], gc_after_trial=True)
    finally:
        reporter.close()
    if failures >= max_failures:
        reporter.note(f"stopped after {failures} failed trials in a row; see `paretoslim "
                      f"front {spec.name} --all` for their reasons")
    return study


def _completed(study: optuna.Study) -> int:
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

