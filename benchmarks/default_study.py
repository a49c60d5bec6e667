"""The default study end to end, as the README's first command runs it, and what it found:
wall time, trials by outcome, the best speedup and compression at <= 1 point, trials per
hour, and how many stopped trials would have ended feasible (each re-run to the end)."""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

from optuna.trial import TrialState

from paretoslim.kernels import detect_target
from paretoslim.search import load_spec, run_study
from paretoslim.search._measuring import calibration_batches, quality_of
from paretoslim.search._store import StudyStore
from paretoslim.search._study import open_study
from paretoslim.spaces import Recipe, compress

record = StudyStore.record

SPEC = Path(__file__).resolve().parent.parent / "studies" / "fashion_mnist.toml"


def summarize(study, spec, seconds: float) -> dict:
    """Outcomes and the best feasible points of a finished study."""
    trials = study.get_trials(deepcopy=False)
    ran = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED,
                                            TrialState.FAIL)
           and record(t).duplicate_of is None]  # a repeated recipe reuses its figures
    states = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    limit = spec.constraints.max_quality_drop
    done = [record(t).metrics for t in trials if t.state == TrialState.COMPLETE]
    feasible = [m for m in done if m["quality_drop"] <= limit]
    rung_stops = [t for t in trials if t.state == TrialState.PRUNED
                  and "fine-tune step" in (record(t).stopped or "")]
    full_infeasible = len(done) - len(feasible) + sum(
        t.state == TrialState.PRUNED and "above the limit" in (record(t).stopped or "")
        for t in trials)
    best = {key: max(feasible, key=lambda m, k=key: m[k], default=None)
            for key in ("speedup", "compression")}
    return {
        "cpu": detect_target("cpu-x86").to_dict(), "wall_s": round(seconds, 1),
        "states": {k: v for k, v in states.items() if v},
        "trials_per_hour": round(3600 * len(ran) / seconds, 1),
        "full_budget_infeasible": full_infeasible, "rung_stops": len(rung_stops),
        "failures": [record(t).failure for t in trials
                     if t.state == TrialState.FAIL],
        "trials": [_row(t) for t in trials],
        **{f"best_{key}": None if m is None else {
            "speedup": m["speedup"], "compression": m["compression"],
            "quality_drop": m["quality_drop"], "recipe": _short(study, m)}
           for key, m in best.items()},
    }


def _row(trial) -> dict:
    """One trial's outcome in a line of figures."""
    m = record(trial).metrics
    recipe = record(trial).recipe
    return {"number": trial.number, "state": trial.state.name,
            "recipe": Recipe.from_dict(recipe).short() if recipe else "",
            **{k: m[k] for k in ("quality_drop", "speedup", "compression", "finetune_steps",
                                 "trial_s", "promoted") if k in m},
            **({"stopped": record(trial).stopped}
               if record(trial).stopped else {})}


def _short(study, metrics: dict) -> str:
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if record(t).metrics is metrics or record(t).metrics == metrics:
            return Recipe.from_dict(record(t).recipe).short()
    return ""


def false_stops(study, spec) -> dict:
    """Re-run every trial stopped at a rung to the end: how many would have been feasible."""
    from paretoslim.search import load_task

    task = load_task(spec.task, spec.base_dir, spec.task_options)
    teacher = quality_of(task, task.model)
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)):
        if "fine-tune step" not in (record(t).stopped or ""):
            continue
        model, _ = compress(task.model, Recipe.from_dict(record(t).recipe),
                            example_input=task.example_input, train=task.train,
                            calibration=calibration_batches(task),
                            finetune_steps=spec.finetune.steps,
                            learning_rate=spec.finetune.learning_rate, seed=spec.seed,
                            student_factory=task.student)
        drop = teacher - quality_of(task, model)
        rows.append({"number": t.number, "drop": drop,
                     "feasible": drop <= spec.constraints.max_quality_drop})
    return {"stopped_at_rungs": len(rows), "would_be_feasible": sum(r["feasible"] for r in rows),
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", type=Path, default=SPEC)
    parser.add_argument("--storage", default=None, help="default: a fresh journal in ./runs")
    parser.add_argument("--false-stops", action="store_true",
                        help="re-run each trial stopped at a rung to the end")
    parser.add_argument("--stopped-only", action="store_true",
                        help="with --storage and --false-stops: re-run the stopped trials "
                             "of that finished study, without running it")
    parser.add_argument("--out", type=Path, default=Path("default_study.json"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    spec = load_spec(args.spec)
    if args.stopped_only:
        study = open_study(spec, args.storage)
        summary = {"false_stops": false_stops(study, spec)}
        args.out.write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))
        return
    started = time.perf_counter()
    study = run_study(spec, storage=args.storage)
    summary = summarize(study, spec, time.perf_counter() - started)
    if args.false_stops:
        summary["false_stops"] = false_stops(study, spec)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
