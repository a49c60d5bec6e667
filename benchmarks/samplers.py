"""Samplers compared at equal wall time by the hypervolume of the feasible front.

Each arm runs the default study (`studies/fashion_mnist.toml`) with a time budget, into a
fresh journal, once per seed; the arms differ only in what the spec says below. The
hypervolume is taken over the feasible completed trials in (quality drop, 1 / speedup,
1 / compression), all minimized, from the reference point (max_quality_drop, 1, 1): the
quality at the constraint and the teacher's latency and size, each trial's speedup being
timed against the teacher side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import tomllib
from optuna.trial import TrialState

from paretoslim.evaluators import CACHE_ENV, cache_dir
from paretoslim.kernels import detect_target
from paretoslim.search import parse_spec, run_study
from paretoslim.search._private import compute_hypervolume
from paretoslim.search._store import StudyStore

record = StudyStore.record

SPEC = Path(__file__).resolve().parent.parent / "studies" / "fashion_mnist.toml"
OFF = {"seeds": [], "stopping": {"enabled": False}}
ARMS = {
    # the default study as shipped: two tiers (candidates predicted, the front measured)
    "default": {},
    # the default study with every trial measured (seed recipes, then the sampler)
    "single-tier": {"candidates": {"count": 0}},
    # random search, nothing else
    "random": {"sampler": {"name": "random"}, **OFF},
    # NSGA-II without seeds, stopping or promotion
    "nsga2-plain": {"sampler": {"name": "nsga2"}, **OFF},
    # the default's seeds, stopping and promotion under another sampler
    "tpe": {"sampler": {"name": "tpe"}},
    "gp": {"sampler": {"name": "gp"}},
    "nsga2": {"sampler": {"name": "nsga2"}},
    # the default with successive halving on non-dominated rank at the rungs
    "halving": {"stopping": {"halving": 2}},
}


def hypervolume(study, limit: float) -> tuple[float, int]:
    """The feasible front's hypervolume and how many feasible trials it was taken over."""
    points = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        m = record(t).metrics
        if m.get("quality_drop", np.inf) <= limit and record(t).duplicate_of is None:
            points.append([m["quality_drop"], 1 / m["speedup"], 1 / m["compression"]])
    if not points:
        return 0.0, 0
    return compute_hypervolume(np.array(points), np.array([limit, 1.0, 1.0])), len(points)


def cold_cache(runs: Path, name: str) -> Path:
    """A fresh cache directory for one run holding only links to the cached teachers: the
    elastic student, the latency model and compiled programs are built inside the budget."""
    cold = runs / f"cache-{name}"
    shutil.rmtree(cold, ignore_errors=True)
    cold.mkdir(parents=True)
    for teacher in cache_dir().glob("*_teacher_*.pt"):
        (cold / teacher.name).symlink_to(teacher.resolve())
    return cold


def run_arm(name: str, seed: int, budget: float, runs: Path, cold: bool = False) -> dict:
    if cold:
        os.environ[CACHE_ENV] = str(cold_cache(runs, f"{name}-{seed}"))
    data = tomllib.loads(SPEC.read_text())
    for key, value in ARMS[name].items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    data.update(name=f"{name}-{seed}", seed=seed, trials=1000, time_budget_s=budget,
                storage=str(runs / f"{name}-{seed}.log"))
    spec = parse_spec(data, SPEC)
    started = time.perf_counter()
    study = run_study(spec, progress=False)
    seconds = time.perf_counter() - started
    limit = spec.constraints.max_quality_drop
    hv, feasible = hypervolume(study, limit)
    done = [record(t).metrics for t in study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE,)) if record(t).metrics]
    ok = [m for m in done if m["quality_drop"] <= limit]
    return {"arm": name, "seed": seed, "wall_s": round(seconds, 1), "hypervolume": hv,
            "feasible": feasible, "trials": len(study.trials),
            "best_speedup": max((m["speedup"] for m in ok), default=None),
            "best_compression": max((m["compression"] for m in ok), default=None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arms", nargs="+", default=["random", "nsga2-plain", "default"],
                        choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budget", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--runs", type=Path, default=Path("runs/samplers"))
    parser.add_argument("--out", type=Path, default=Path("samplers.jsonl"))
    parser.add_argument("--cold", action="store_true",
                        help="each run with nothing cached but the teacher")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    args.runs.mkdir(parents=True, exist_ok=True)
    rows = []
    with args.out.open("a") as out:
        for seed in args.seeds:
            for arm in args.arms:
                row = {**run_arm(arm, seed, args.budget, args.runs, args.cold),
                       "cold": args.cold,
                       "cpu": detect_target("cpu-x86").cpu}
                rows.append(row)
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(json.dumps(row), file=sys.stderr)
    for arm in args.arms:
        values = [r["hypervolume"] for r in rows if r["arm"] == arm]
        print(f"{arm:12s} hypervolume median {statistics.median(values):.4f} "
              f"(min {min(values):.4f}, max {max(values):.4f}, {len(values)} runs)")


if __name__ == "__main__":
    main()
