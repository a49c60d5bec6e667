"""The Pareto front (or every trial) of a study as a table, CSV, JSON or parquet."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

import optuna
import pandas as pd

from ._errors import ParetoslimError
from ._figures import fmt, short_recipe
from ._pareto import FrontPoint, pareto_front, within_noise
from ._store import StudyStore

FORMATS = ("table", "csv", "json", "parquet")
_COLUMNS = ("quality", "quality_drop", "latency_ms", "speedup", "size_mb", "compression")


def front_frame(points: list[FrontPoint], sort: str | None = None) -> pd.DataFrame:
    """One row per point: number, the headline figures, the speedup's 95% interval,
    ``~`` where the point's place rests on a latency difference inside the timing noise
    (``within_noise``), and the short recipe."""
    rows = []
    tied = within_noise(points)
    for p in points:
        row: dict[str, Any] = {"trial": p.number}
        for column in _COLUMNS:
            row[column] = p.metrics.get(column, p.values.get(column))
        row["speedup_95"] = _interval(p.metrics)
        row["noise"] = "~" if p.number in tied else ""
        row["recipe"] = short_recipe(p.recipe)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["trial", *_COLUMNS, "speedup_95", "noise", "recipe"])
    if sort:
        if sort not in frame.columns:
            raise ParetoslimError(
                f"cannot sort by {sort!r}; columns: {', '.join(frame.columns)}")
        frame = frame.sort_values(sort, ascending=sort not in ("quality", "speedup",
                                                                 "compression"))
    return frame


def _interval(metrics: dict[str, Any]) -> str:
    low, high = metrics.get("speedup_low"), metrics.get("speedup_high")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (low, high)):
        return ""
    return f"{low:.2f}-{high:.2f}x"


def trials_frame(study: optuna.Study, candidates: optuna.Study | None = None) -> pd.DataFrame:
    """Every trial with its tier, state, figures, recipe and failure reason: the measured
    ones, then the ``candidates`` of the predicted tier (state ``predicted``: their figures
    are predictions, never measurements)."""
    rows = []
    tiers = [("measured", study)] + ([("predicted", candidates)] if candidates else [])
    for tier, source in tiers:
        for t, record in StudyStore(source).trials():
            metrics = record.metrics
            state = t.state.name.lower()
            if tier == "predicted" and t.state.name == "COMPLETE":
                state = "predicted"
            row: dict[str, Any] = {"tier": tier, "trial": t.number, "state": state}
            for column in _COLUMNS:
                row[column] = metrics.get(column)
            row["recipe"] = short_recipe(record.recipe)
            row["failure"] = record.failure or ""
            rows.append(row)
    return pd.DataFrame(rows, columns=["tier", "trial", "state", *_COLUMNS, "recipe",
                                       "failure"])


def render_front(study: optuna.Study, fmt: str = "table", sort: str | None = None,
                 all_trials: bool = False, candidates: optuna.Study | None = None) -> str:
    """The front (or every trial with ``all_trials``, the predicted tier's ``candidates``
    included) as ``table``, ``csv`` or ``json``."""
    if fmt not in FORMATS or fmt == "parquet":
        raise ParetoslimError(f"cannot print format {fmt!r}; choose from table, csv, json")
    points = pareto_front(study)
    if fmt == "json":
        if all_trials:
            return trials_frame(study, candidates).to_json(orient="records", indent=2)
        return json.dumps([asdict(p) for p in points], indent=2)
    frame = trials_frame(study, candidates) if all_trials else front_frame(points, sort)
    if fmt == "csv":
        return frame.to_csv(index=False)
    if frame.empty:
        return (f"study {study.study_name!r}: no feasible Pareto-optimal trial yet "
                f"({StudyStore(study).completed_count()} completed); see --all")
    return _table(frame)


def write_front(study: optuna.Study, path: str, fmt: str = "table", sort: str | None = None,
                all_trials: bool = False, candidates: optuna.Study | None = None) -> None:
    """Write what ``render_front`` shows to ``path``; ``parquet`` writes the raw frame."""
    if fmt != "parquet":
        text = render_front(study, fmt, sort=sort, all_trials=all_trials,
                            candidates=candidates)
        with open(path, "w") as handle:
            handle.write(text if text.endswith("\n") else text + "\n")
        return
    frame = (trials_frame(study, candidates) if all_trials
             else front_frame(pareto_front(study), sort))
    try:
        frame.to_parquet(path, index=False)
    except ImportError:
        raise ParetoslimError(
            "parquet output needs pyarrow: pip install 'paretoslim[parquet]'") from None


def _table(frame: pd.DataFrame) -> str:
    shown = frame.copy()
    for column in _COLUMNS:
        if column in shown:
            shown[column] = [fmt(column, v) for v in shown[column]]
    return shown.to_string(index=False)
