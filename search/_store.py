"""The study store: every record paretoslim keeps of a study and its trials, over an Optuna
storage. The only module that reads or writes Optuna user attributes (a dead process's trial
is failed through ``_private.fail_trial``, which writes its reason where this module says).

The contract, as Optuna's ``BaseStorage`` states its own:

- **Who owns a RUNNING trial.** The process that asked for it, until it tells Optuna the
  trial's state. A trial whose process died is finished by the run holding the study's
  lease (``mark_interrupted``), never by another; a worker's trial (``heartbeats``) is
  left to Optuna's heartbeats, which fail it for the next worker to retry.
- **What is written when.** On enqueueing a candidate of the predicted tier: its predicted
  figures (``prediction``). On start: the recipe, then the process (``worker``), and for a
  worker the failure reason that holds should it die (cleared once the result is written).
  On a result (``write_result``): the metrics, then the stop or failure reason, or the
  quality constraint and then the objective values. On a repeat of a recipe: the
  earlier trial's metrics, its number (``duplicate_of``), constraint and values, or its
  stop reason.
- **Which writes precede the state change.** Every record of a trial is written before
  Optuna is told its state, the values last: a trial holding values has its whole
  result, and ``settle_running`` completes it from them if its process died before
  telling Optuna.
- Stored studies of every earlier format still load: every field is optional.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from . import _record as stored
from ._private import fail_trial, finish_trial
from ._record import TrialRecord, TrialResult, json_safe, sound_study_attrs, sound_trial_attrs
from ._spec import StudySpec
from ._tally import OutcomeKind

Trial = optuna.Trial | FrozenTrial


class StudyStore:
    """The records of ``study`` (see the module's contract)."""

    def __init__(self, study: optuna.Study):
        self.study = study

    # --- reading ------------------------------------------------------------------------

    @staticmethod
    def record(trial: Trial) -> TrialRecord:
        """What paretoslim recorded of ``trial``."""
        return TrialRecord.from_attrs(trial.number, trial.user_attrs)

    def trials(self, *states: TrialState) -> list[tuple[FrozenTrial, TrialRecord]]:
        """The study's trials in ``states`` (all without), each with its record."""
        found = self.study.get_trials(deepcopy=False, states=states or None)
        return [(t, self.record(t)) for t in found]

    def completed_count(self) -> int:
        """How many trials completed with a recipe of their own (a trial that repeated an
        earlier recipe and copied its figures is not counted)."""
        return sum(r.duplicate_of is None for _, r in self.trials(TrialState.COMPLETE))

    def completed_records(self) -> list[TrialRecord]:
        """The records of the trials that completed a recipe of their own."""
        return [r for _, r in self.trials(TrialState.COMPLETE) if r.duplicate_of is None]

    @staticmethod
    def enqueue_predicted(study: optuna.Study, params: dict[str, Any],
                          prediction: dict[str, Any]) -> None:
        """Enqueue a candidate's parameters with its predicted figures."""
        study.enqueue_trial(params, user_attrs={stored.PREDICTION: json_safe(prediction)})

    @classmethod
    def outcome(cls, trial: FrozenTrial) -> OutcomeKind:
        """What a finished trial brought: ``new`` (a recipe completed), ``repeat`` (an earlier
        recipe's figures or stop copied), ``stopped`` or ``failed``."""
        if cls.record(trial).duplicate_of is not None:
            return "repeat"
        return {TrialState.COMPLETE: "new", TrialState.PRUNED: "stopped"}.get(trial.state,
                                                                                "failed")

    def spec_record(self) -> dict[str, Any]:
        """The spec's path, name, objectives and quality limit, as the run recorded them."""
        spec = self.study.user_attrs.get(stored.SPEC)
        return spec if isinstance(spec, dict) else {}

    def objective_names(self) -> list[str]:
        """The study's objectives, in order, as its spec named them."""
        return list(self.spec_record().get("objectives") or
                    ["quality", "latency_ms", "size_mb"][: len(self.study.directions)])

    def target(self, default: int) -> int:
        """The completed trials the last Ray run aimed at (``default`` when none did)."""
        return int(self.study.user_attrs.get(stored.TARGET, default))

    def driver(self) -> str:
        """The run that holds a database study's lease, as it named itself."""
        return str(self.study.user_attrs.get(stored.DRIVER, ""))

    def same_recipe(self, recipe: Any, state: TrialState, *, stopped: bool = False
                    ) -> FrozenTrial | None:
        """The first trial in ``state`` that ran ``recipe`` itself (not as a repeat), with a
        stop reason when ``stopped``."""
        if recipe is None:  # an unreadable recipe matches nothing
            return None
        for trial, record in self.trials(state):
            if (record.duplicate_of is None and (record.stopped or not stopped)
                    and record.recipe and record.parsed_recipe() == recipe):
                return trial
        return None

    # --- writing ------------------------------------------------------------------------

    def write_spec(self, spec: StudySpec) -> None:
        """Record the spec once, when the study is created (see ``spec_record``)."""
        if stored.SPEC not in self.study.user_attrs:
            path = str(spec.path.resolve()) if spec.path is not None else None
            self.write_spec_record({
                "path": path, "name": spec.name, "objectives": list(spec.objectives),
                "max_quality_drop": spec.constraints.max_quality_drop})

    def write_spec_record(self, record: dict[str, Any]) -> None:
        self.study.set_user_attr(stored.SPEC, record)

    def write_target(self, target: int) -> None:
        self.study.set_user_attr(stored.TARGET, target)

    def write_driver(self, holder: str) -> None:
        self.study.set_user_attr(stored.DRIVER, holder)

    @staticmethod
    def write(trial: optuna.Trial, record: TrialRecord) -> None:
        """Write the set fields of ``record`` on the running ``trial``, in contract order."""
        for key, value in record.to_attrs().items():
            trial.set_user_attr(key, value)

    @classmethod
    def begin(cls, trial: optuna.Trial, recipe: dict[str, Any]) -> None:
        """Record the recipe a trial is about to run."""
        cls.write(trial, TrialRecord(recipe=recipe))

    @classmethod
    def claim(cls, trial: optuna.Trial, worker: str) -> None:
        """Record the process about to run ``trial``'s recipe."""
        cls.write(trial, TrialRecord(worker=worker))

    @classmethod
    def expect_heartbeats(cls, trial: optuna.Trial, lost: str) -> None:
        """Mark a worker's trial, which fails with the reason ``lost`` should the worker die
        (``clear_lost`` once its result is written)."""
        cls.write(trial, TrialRecord(heartbeats=True, failure=lost))

    @staticmethod
    def clear_lost(trial: optuna.Trial) -> None:
        trial.set_user_attr(stored.FAILURE, "")

    @staticmethod
    def note_failure(trial: optuna.Trial, reason: str) -> None:
        """Record why a running trial fails (before Optuna is told)."""
        trial.set_user_attr(stored.FAILURE, reason)

    def copy_earlier(self, trial: optuna.Trial) -> tuple[tuple[float, ...] | None, str | None]:
        """If a trial ran ``trial``'s recipe to completion, copy its figures here and return
        its values; else if one was stopped early, mark this one its repeat and return the
        stop reason (the pipeline is deterministic); else ``(None, None)``."""
        recipe = self.record(trial).parsed_recipe()
        other = self.same_recipe(recipe, TrialState.COMPLETE)
        if other is not None:
            self.write(trial, TrialRecord(metrics=self.record(other).metrics,
                                          duplicate_of=other.number))
            for name, value in other.constraints.items():
                trial.set_constraint(name, value)
            self.write(trial, TrialRecord(values=tuple(other.values)))
            return tuple(other.values), None
        other = self.same_recipe(recipe, TrialState.PRUNED, stopped=True)
        if other is None:
            return None, None
        reason = self.record(other).stopped
        self.write(trial, TrialRecord(duplicate_of=other.number, stopped=reason))
        return None, reason

    @classmethod
    def write_result(cls, trial: optuna.Trial, spec: StudySpec, result: TrialResult
                     ) -> tuple[float, ...] | None:
        """Record a trial's result (see the contract); return its objective values, or None
        when it failed or was stopped (the caller then tells Optuna FAIL or PRUNED)."""
        record = TrialRecord(metrics=json_safe(result.metrics))
        if result.stopped is not None:
            cls.write(trial, replace(record, stopped=result.stopped))
            return None
        if not result.ok:
            cls.write(trial, replace(record, failure=result.failure))
            return None
        cls.write(trial, record)
        drop = result.metrics["quality_drop"]
        trial.set_constraint("max_quality_drop", drop - spec.constraints.max_quality_drop)
        values = tuple(result.values[name] for name in spec.objectives)
        cls.write(trial, TrialRecord(values=values))
        return values

    # --- trials a dead process left running ---------------------------------------------

    def settle_running(self, trial: FrozenTrial, reason: str) -> TrialState:
        """Finish a trial its process left running as far as it got; return the state given:
        completed with a whole recorded result, pruned when stopped early, else failed with
        its recorded failure reason or ``reason``."""
        record = self.record(trial)
        if record.complete and len(record.values) == len(self.study.directions):
            finish_trial(self.study, trial, TrialState.COMPLETE,
                         [float(v) for v in record.values])
            return TrialState.COMPLETE
        if record.stopped:
            finish_trial(self.study, trial, TrialState.PRUNED)
            return TrialState.PRUNED
        self.fail_running(trial, record.failure or reason)
        return TrialState.FAIL

    def fail_running(self, trial: FrozenTrial, reason: str) -> None:
        """Record a trial its process left running as failed, saying why."""
        fail_trial(self.study, trial, stored.FAILURE, reason)

    def mark_interrupted(self) -> dict[str, int]:
        """Settle the trials a killed process left running (``settle_running``), except a
        worker's; return how many ended in each state (``complete``, ``pruned``, ``fail``).
        Call it only holding the study's lease (``_lease``)."""
        counts: dict[str, int] = {}
        for trial, record in self.trials(TrialState.RUNNING):
            if record.heartbeats:
                continue
            state = self.settle_running(trial, "interrupted: the process running this trial "
                                               "ended before it finished")
            counts[state.name.lower()] = counts.get(state.name.lower(), 0) + 1
        return counts

    def running_unclaimed(self) -> list[FrozenTrial]:
        """Running trials that send no heartbeats (not a worker's)."""
        return [t for t, r in self.trials(TrialState.RUNNING) if not r.heartbeats]

    # --- a copy for the read-only verbs -------------------------------------------------

    def readable_copy(self, warn: Callable[[str], None]) -> optuna.Study:
        """An in-memory copy of the study: same name, directions, trials and records, except
        records of a type paretoslim does not write, which are dropped (``warn`` says
        which). Raises ValueError when the storage's trials cannot be read at all."""
        study = self.study
        try:
            trials = study.get_trials(deepcopy=True)
            directions, attrs = study.directions, dict(study.user_attrs)
        except Exception as exc:  # a record Optuna itself cannot decode
            raise ValueError(f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
                             ) from None
        copy = optuna.create_study(study_name=study.study_name, directions=directions)
        problems: list[str] = []
        for key, value in sound_study_attrs(attrs, len(directions), problems).items():
            copy.set_user_attr(key, value)
        for trial in trials:
            trial.user_attrs = sound_trial_attrs(trial.number, trial.user_attrs, problems)
            trial.system_attrs = _sound_system(trial, problems)
        copy.add_trials(trials)
        if problems:
            more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
            warn(f"study {study.study_name!r}: records of another type left out: "
                 f"{'; '.join(problems[:3])}{more}")
        return copy


def _sound_system(trial: FrozenTrial, problems: list[str]) -> dict[str, Any]:
    """The trial's Optuna system attributes without constraints of another type."""
    system = dict(trial.system_attrs)
    constraints = system.get("constraints")
    if "constraints" in system and not (isinstance(constraints, (list, tuple)) and all(
            stored.is_a(c, float) for c in constraints)):
        problems.append(f"trial {trial.number} constraints")
        system.pop("constraints")
    return system


def settled_note(counts: dict[str, int]) -> str:
    """What ``mark_interrupted`` did, as a sentence ("" when nothing was left running)."""
    if not counts:
        return ""
    said = {"complete": "completed from their recorded results", "pruned": "recorded as "
            "stopped early", "fail": "recorded as failed"}
    parts = [f"{n} {said[state]}" for state, n in sorted(counts.items())]
    return (f"{sum(counts.values())} trial(s) left running by an earlier process: "
            + ", ".join(parts))
