"""What the read-only verbs see of a stored study: an in-memory copy whose records have the
types paretoslim writes; a record of another type is left out of the copy, with a warning."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from ..spaces import Recipe
from ._errors import ParetoslimError
from ._spec import StudySpec
from ._store import (
    DUPLICATE_ATTR,
    FAILURE_ATTR,
    HEARTBEAT_ATTR,
    METRICS_ATTR,
    RECIPE_ATTR,
    SPEC_ATTR,
    STOPPED_ATTR,
    TARGET_ATTR,
    VALUES_ATTR,
    WORKER_ATTR,
    resolve_study,
)

# user attributes of a trial and of a study, with the type each must have
_NUMBER, _TEXT, _TABLE, _FLAG = "a number", "text", "a table", "true or false"
_NUMERIC_METRICS = frozenset((
    "quality", "quality_drop", "latency_ms", "speedup", "size_mb", "compression",
    "baseline_quality", "baseline_size_mb", "baseline_latency_ms", "baseline_parameters",
    "parameters", "speedup_spread", "latency_iqr_ms", "latency_cov", "baseline_latency_iqr_ms",
    "latency_calls", "latency_attempts", "compile_s", "sparse_speedup", "latency_batch_size",
    "threads", "compress_s", "trial_s", "seed", "finetune_steps", "stopped_at_step",
    "latency_cached_from"))
_TEXT_METRICS = frozenset(("structure", "rungs", "lowering", "lowering_error",
                           "sparse_execution", "measured_on", "traceback"))
_TABLE_METRICS = frozenset(("target", "stage_seconds"))
_FLAG_METRICS = frozenset(("latency_noisy", "latency_timed_before_finetune"))
_RUNGS = re.compile(r"(\d+:-?[\d.]+(e-?\d+)?)(,\d+:-?[\d.]+(e-?\d+)?)*")


def resolve_readable(ref: str, storage: str | None, warn: Callable[[str], None]
                     ) -> tuple[optuna.Study, StudySpec | None]:
    """``resolve_study``, the study given as its ``readable_copy``: what read-only verbs use."""
    study, spec = resolve_study(ref, storage)
    return readable_copy(study, warn), spec


def readable_copy(study: optuna.Study, warn: Callable[[str], None]) -> optuna.Study:
    """An in-memory copy of ``study`` for views: same name, directions, trials and records,
    except records of a type paretoslim does not write, which are dropped (``warn`` says
    which). Raises ParetoslimError when the storage's trials cannot be read at all."""
    try:
        trials = study.get_trials(deepcopy=True)
        directions, attrs = study.directions, dict(study.user_attrs)
    except ParetoslimError:
        raise
    except Exception as exc:  # a record Optuna itself cannot decode
        raise ParetoslimError(f"study {study.study_name!r}: its trials cannot be read "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
                              "the storage is damaged or not written by paretoslim") from None
    copy = optuna.create_study(study_name=study.study_name, directions=directions)
    problems: list[str] = []
    for key, value in _study_attrs(attrs, len(directions), problems).items():
        copy.set_user_attr(key, value)
    copy.add_trials([_sound(t, problems) for t in trials])
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        warn(f"study {study.study_name!r}: records of another type left out: "
             f"{'; '.join(problems[:3])}{more}")
    return copy


def _study_attrs(attrs: dict[str, Any], objectives: int, problems: list[str]
                 ) -> dict[str, Any]:
    spec = attrs.get(SPEC_ATTR)
    if SPEC_ATTR in attrs and not isinstance(spec, dict):
        problems.append(f"the study's spec record is {_kind(spec)}")
        attrs.pop(SPEC_ATTR)
    elif isinstance(spec, dict):
        spec = dict(spec)
        names = spec.get("objectives")
        if "objectives" in spec and not (isinstance(names, list) and len(names) == objectives
                                         and all(isinstance(n, str) for n in names)):
            problems.append("the study's objective names")
            spec.pop("objectives")
        for key, wanted in (("path", str), ("name", str), ("max_quality_drop", float)):
            if key in spec and not _is(spec[key], wanted):
                problems.append(f"the study's spec {key}")
                spec.pop(key)
        attrs[SPEC_ATTR] = spec
    if TARGET_ATTR in attrs and not _is(attrs[TARGET_ATTR], int):
        problems.append("the study's target trials")
        attrs.pop(TARGET_ATTR)
    return attrs


def _sound(trial: FrozenTrial, problems: list[str]) -> FrozenTrial:
    """``trial`` with every record of the wrong type removed (``problems`` says which)."""
    attrs = trial.user_attrs
    kept: dict[str, Any] = {}
    for key, value in attrs.items():
        problem = _attr_problem(key, value)
        if problem:
            problems.append(f"trial {trial.number} {key} ({problem})")
        else:
            kept[key] = value
    if isinstance(kept.get(METRICS_ATTR), dict):
        kept[METRICS_ATTR] = _sound_metrics(trial.number, kept[METRICS_ATTR], problems)
    constraints = trial.system_attrs.get("constraints")
    system = dict(trial.system_attrs)
    if "constraints" in system and not (isinstance(constraints, (list, tuple)) and all(
            _is(c, float) for c in constraints)):
        problems.append(f"trial {trial.number} constraints")
        system.pop("constraints")
    trial.user_attrs, trial.system_attrs = kept, system
    return trial


def _attr_problem(key: str, value: Any) -> str:
    if key == RECIPE_ATTR:
        try:
            Recipe.from_dict(value)
        except Exception:  # any recipe from_dict refuses is unusable here
            return "not a recipe"
        return ""
    wanted = {METRICS_ATTR: dict, VALUES_ATTR: list, FAILURE_ATTR: str, STOPPED_ATTR: str,
              DUPLICATE_ATTR: int, WORKER_ATTR: str, HEARTBEAT_ATTR: bool}.get(key)
    if wanted is None or _is(value, wanted):
        if key == VALUES_ATTR and not all(_is(v, float) for v in value):
            return "not a list of numbers"
        return ""
    return f"{_kind(value)}, not {_name(wanted)}"


def _sound_metrics(number: int, metrics: dict[str, Any], problems: list[str]
                   ) -> dict[str, Any]:
    kept = {}
    for key, value in metrics.items():
        wanted = (float if key in _NUMERIC_METRICS else str if key in _TEXT_METRICS
                  else dict if key in _TABLE_METRICS else bool if key in _FLAG_METRICS
                  else None)
        if wanted is float and value is None:  # a non-finite figure is stored as null
            kept[key] = value
        elif wanted is not None and not _is(value, wanted):
            problems.append(f"trial {number} metrics {key} ({_kind(value)})")
        elif key == "rungs" and value and not _RUNGS.fullmatch(value):
            problems.append(f"trial {number} metrics rungs")
        else:
            kept[key] = value
    return kept


def _is(value: Any, wanted: type) -> bool:
    if wanted is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    if wanted is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, wanted)


def _kind(value: Any) -> str:
    return {dict: _TABLE, list: "a list", str: _TEXT, bool: _FLAG}.get(
        type(value), _NUMBER if isinstance(value, (int, float)) else type(value).__name__)


def _name(wanted: type) -> str:
    return {float: _NUMBER, int: "a whole number", str: _TEXT, dict: _TABLE, list: "a list",
            bool: _FLAG}[wanted]
