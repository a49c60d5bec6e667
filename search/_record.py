"""What a trial reports and the record paretoslim keeps of it and of its study, as plain
data: their fields, their stored form (Optuna user attributes) and the types a stored
record must have to be read."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..spaces import Recipe

# the stored names of a trial's fields
RECIPE = "recipe"
METRICS = "metrics"
VALUES = "values"  # the objective values, written last: the trial's result is complete
FAILURE = "fail_reason"
STOPPED = "stopped"  # why a trial was stopped early (it is PRUNED)
DUPLICATE = "duplicate_of"
WORKER = "worker"
HEARTBEATS = "sends_heartbeats"
PREDICTION = "prediction"  # the predicted figures of a candidate the measured tier runs
FOR_PROMOTION = "picked_for_promotion"  # a candidate only a promoted fine-tune brings in
# the stored names of a study's fields
SPEC = "spec"
TARGET = "target_trials"
DRIVER = "driver"  # the run that holds a database study's lease


@dataclass
class TrialResult:
    """What a trial reports: objective values and metrics, the reason it failed, or the
    reason it was stopped early (``stopped``; its metrics hold the figures measured so far)."""

    recipe: Recipe
    values: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None
    stopped: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None and self.stopped is None


@dataclass(frozen=True)
class TrialRecord:
    """What paretoslim records of trial ``number``: the recipe (as stored), the metrics, the
    objective ``values`` once its result is complete, why it ``failed`` or was ``stopped``,
    the trial whose figures or stop it copied (``duplicate_of``), the process that ran it
    and whether that process sends heartbeats (a worker's); for a candidate of the
    predicted tier run by the measured one, its ``prediction``."""

    number: int = -1
    recipe: dict[str, Any] | None = None  # a record read from storage holds dicts here
    metrics: dict[str, Any] | None = None
    values: tuple[float, ...] | None = None
    failure: str | None = None
    stopped: str | None = None
    duplicate_of: int | None = None
    worker: str | None = None
    heartbeats: bool = False
    prediction: dict[str, Any] | None = None

    @classmethod
    def from_attrs(cls, number: int, attrs: dict[str, Any]) -> TrialRecord:
        """The record of stored attributes (every field optional)."""
        values = attrs.get(VALUES)
        return cls(number, attrs.get(RECIPE) or {}, attrs.get(METRICS) or {},
                   tuple(values) if isinstance(values, list) else None,
                   attrs.get(FAILURE) or None, attrs.get(STOPPED) or None,
                   attrs.get(DUPLICATE), attrs.get(WORKER), bool(attrs.get(HEARTBEATS)),
                   attrs.get(PREDICTION) or None)

    def to_attrs(self) -> dict[str, Any]:
        """The stored attributes of the fields that are set, in the order they are written:
        the values last."""
        attrs: dict[str, Any] = {}
        for key, value in ((RECIPE, self.recipe), (PREDICTION, self.prediction),
                           (WORKER, self.worker),
                           (HEARTBEATS, self.heartbeats or None), (METRICS, self.metrics),
                           (DUPLICATE, self.duplicate_of), (STOPPED, self.stopped),
                           (FAILURE, self.failure)):
            if value is not None:
                attrs[key] = value
        if self.values is not None:
            attrs[VALUES] = list(self.values)
        return attrs

    def parsed_recipe(self) -> Recipe | None:
        """The stored recipe as a Recipe (keys added since then take their defaults), or None
        when there is none or it cannot be read."""
        try:
            return Recipe.from_dict(self.recipe) if self.recipe else None
        except (TypeError, ValueError):
            return None

    @property
    def complete(self) -> bool:
        """Whether the record holds a whole result: metrics and finite objective values."""
        return bool(self.metrics) and self.values is not None and all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in self.values)

    @property
    def rungs(self) -> list[tuple[int, float]]:
        """``(step, slice quality)`` at each rung of the fine-tune."""
        text = self.metrics.get("rungs") or ""
        return [(int(step), float(quality)) for step, quality in
                (entry.split(":") for entry in text.split(",") if entry)]

    @property
    def promoted(self) -> bool:
        """Whether the trial's fine-tune was promoted to more steps."""
        return "promoted" in self.metrics

    @property
    def structure(self) -> str | None:
        """The fingerprint of the timed structure (None: not timed)."""
        return self.metrics.get("structure") or None


def prediction_errors(prediction: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """A measured candidate's predicted figures beside its measured ones: the prediction
    itself and its errors (latency, speedup and size relative, ``predicted / measured - 1``;
    quality drop in the metric's units, ``predicted - measured``). The speedup's error is
    free of the machine's drift between processes, which moves both timings alike."""
    out = {k: v for k, v in prediction.items()
           if k.startswith("predicted_") or k in ("candidate", FOR_PROMOTION)}
    for name in ("latency_ms", "size_mb", "speedup"):
        predicted, measured = prediction.get(f"predicted_{name}"), metrics.get(name)
        if predicted is not None and measured:
            out[f"{name.split('_')[0]}_prediction_error"] = predicted / measured - 1.0
    if "predicted_quality_drop" in prediction and "quality_drop" in metrics:
        out["quality_drop_prediction_error"] = (prediction["predicted_quality_drop"]
                                                - metrics["quality_drop"])
    return out


def rungs_text(rungs: list[tuple[int, float]]) -> str:
    """Rungs in their stored form, ``"step:quality,..."``."""
    return ",".join(f"{step}:{quality:.4f}" for step, quality in rungs)


def json_safe(value: Any) -> Any:
    """``value`` with string keys, lists for tuples and None for non-finite floats."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --- the types a stored record must have ----------------------------------------------------

_NUMBER, _TEXT, _TABLE, _FLAG = "a number", "text", "a table", "true or false"
_NUMERIC_METRICS = frozenset((
    "quality", "quality_drop", "latency_ms", "speedup", "size_mb", "compression",
    "baseline_quality", "baseline_size_mb", "baseline_latency_ms", "baseline_parameters",
    "parameters", "speedup_spread", "latency_iqr_ms", "latency_cov", "baseline_latency_iqr_ms",
    "latency_calls", "latency_attempts", "compile_s", "sparse_speedup", "latency_batch_size",
    "threads", "compress_s", "trial_s", "seed", "finetune_steps", "stopped_at_step",
    "latency_cached_from", "lowering_error", "promoted_at_step", "speedup_low",
    "speedup_high", "candidate", "predicted_quality", "predicted_quality_drop",
    "predicted_latency_ms", "predicted_size_mb", "predicted_speedup",
    "predicted_finetuned_quality_drop", "latency_prediction_error", "speedup_prediction_error",
    "size_prediction_error", "quality_drop_prediction_error", "proxy_s"))
_TEXT_METRICS = frozenset(("structure", "rungs", "lowering", "sparse_execution",
                           "measured_on", "traceback", "stage_seconds", "promoted", "tier",
                           "start"))
_TABLE_METRICS = frozenset(("target",))
_FLAG_METRICS = frozenset(("latency_noisy", "latency_timed_before_finetune",
                           FOR_PROMOTION))
_RUNGS = re.compile(r"(\d+:-?[\d.]+(e-?\d+)?)(,\d+:-?[\d.]+(e-?\d+)?)*")
_TRIAL_TYPES = {METRICS: dict, VALUES: list, FAILURE: str, STOPPED: str, DUPLICATE: int,
                WORKER: str, HEARTBEATS: bool, PREDICTION: dict}


def sound_trial_attrs(number: int, attrs: dict[str, Any], problems: list[str]
                      ) -> dict[str, Any]:
    """``attrs`` of trial ``number`` without the records of a type paretoslim does not write
    (``problems`` says which)."""
    kept: dict[str, Any] = {}
    for key, value in attrs.items():
        problem = _attr_problem(key, value)
        if problem:
            problems.append(f"trial {number} {key} ({problem})")
        else:
            kept[key] = value
    if isinstance(kept.get(METRICS), dict):
        kept[METRICS] = _sound_metrics(number, kept[METRICS], problems)
    return kept


def sound_study_attrs(attrs: dict[str, Any], objectives: int, problems: list[str]
                      ) -> dict[str, Any]:
    """A study's ``attrs`` without the records of another type (see sound_trial_attrs)."""
    attrs = dict(attrs)
    spec = attrs.get(SPEC)
    if SPEC in attrs and not isinstance(spec, dict):
        problems.append(f"the study's spec record is {_kind(spec)}")
        attrs.pop(SPEC)
    elif isinstance(spec, dict):
        spec = dict(spec)
        names = spec.get("objectives")
        if "objectives" in spec and not (isinstance(names, list) and len(names) == objectives
                                         and all(isinstance(n, str) for n in names)):
            problems.append("the study's objective names")
            spec.pop("objectives")
        for key, wanted in (("path", str), ("name", str), ("max_quality_drop", float)):
            if key in spec and not is_a(spec[key], wanted):
                problems.append(f"the study's spec {key}")
                spec.pop(key)
        attrs[SPEC] = spec
    if TARGET in attrs and not is_a(attrs[TARGET], int):
        problems.append("the study's target trials")
        attrs.pop(TARGET)
    return attrs


def _attr_problem(key: str, value: Any) -> str:
    if key == RECIPE:
        try:
            Recipe.from_dict(value)
        except Exception:  # any recipe from_dict refuses is unusable here
            return "not a recipe"
        return ""
    wanted = _TRIAL_TYPES.get(key)
    if wanted is None or is_a(value, wanted):
        if key == VALUES and not all(is_a(v, float) for v in value):
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
        elif wanted is not None and not is_a(value, wanted):
            problems.append(f"trial {number} metrics {key} ({_kind(value)})")
        elif key == "rungs" and value and not _RUNGS.fullmatch(value):
            problems.append(f"trial {number} metrics rungs")
        else:
            kept[key] = value
    return kept


def is_a(value: Any, wanted: type) -> bool:
    """Whether ``value`` is of the stored type ``wanted`` (float: a finite number)."""
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
