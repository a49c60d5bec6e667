"""Verification of an exported artifact: reload it safely and re-measure it on this machine.

An artifact is data: nothing named in it is imported or run. The task to measure it on
comes from the user; the task an export recorded is used only when asked for explicitly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..evaluators import LatencyJob, program_bytes, run_isolated, size_mb
from ..spaces import QUANT_SCHEMES
from ._errors import ParetoslimError
from ._export import METRICS_FILE, MODEL_FILE, load_program
from ._figures import FIGURE_FORMATS
from ._measuring import latency_input, quality_of
from ._spec import LatencySpec, StudySpec
from ._spec_file import parse_section
from ._task import Task, load_task

DEFAULT_TOLERANCE = 0.002
_LATENCY_KEYS = ("batch_size", "sequence_length", "threads", "min_calls", "min_seconds",
                 "max_spread", "lowering")


def verify_artifact(directory: str | Path, task: Task | StudySpec | str | None = None, *,
                    trust_recorded_task: bool = False, tolerance: float = DEFAULT_TOLERANCE,
                    min_calls: int | None = None) -> dict[str, Any]:
    """Re-measure an exported trial: quality on the task's held-out data, size, and latency.

    ``task`` is what to measure on: a Task, a spec (its task and options) or a task
    reference (``path/to/file.py:make_task`` relative to the working directory, or
    ``package.module:make_task``). Only with ``trust_recorded_task`` is the task recorded
    in the artifact's metrics.json imported instead. Latency is timed interleaved with
    the teacher lowered to fp32, in a fresh process, as during the search.
    Returns ``quality``, ``latency_ms``, ``size_mb``, ``speedup``, ``baseline_latency_ms``,
    ``recorded`` (the search-time figures), ``quality_ok`` (quality within ``tolerance`` of
    the recorded one), ``tolerance`` and ``task`` (the reference used). Raises
    ParetoslimError for a directory that is not a sound export (nothing of it is run) or
    whose task cannot be loaded.
    """
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance)
            and tolerance >= 0):
        raise ParetoslimError(f"--tolerance must be a finite number >= 0. Got {tolerance!r}.")
    root = Path(directory)
    meta_path, model_path = root / METRICS_FILE, root / MODEL_FILE
    if not meta_path.is_file() or not model_path.is_file():
        raise ParetoslimError(
            f"{root}: not an exported trial (needs {METRICS_FILE} and {MODEL_FILE}; "
            "create one with `paretoslim export`)")
    meta = read_metrics(meta_path)
    if task is None:
        _recorded_or_refuse(root, meta, trust_recorded_task)  # before anything is loaded
    try:
        model = load_program(model_path)
    except ParetoslimError:
        raise
    except Exception as exc:
        raise ParetoslimError(f"{model_path}: cannot be loaded safely ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:300]})") from None
    reference, user_task = _task(root, meta, task, trust_recorded_task)
    return {**_measure(model, user_task, meta, min_calls, tolerance), "task": reference}


def read_metrics(path: Path) -> dict[str, Any]:
    """An export's metrics.json, checked to be data of the expected shape (ParetoslimError
    otherwise): recorded figures, latency settings within the spec's bounds, a known scheme."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ParetoslimError(f"{path}: not a metrics file written by export ({exc})") from None
    if not isinstance(meta, dict):
        raise ParetoslimError(f"{path}: not a metrics file written by export (not a table)")
    recorded, latency = meta.get("recorded"), meta.get("latency", {})
    quality = recorded.get("quality") if isinstance(recorded, dict) else None
    if (not isinstance(quality, (int, float)) or isinstance(quality, bool)
            or not math.isfinite(quality)):
        raise ParetoslimError(f"{path}: no recorded quality to compare with; export the "
                              "trial again")
    meta["latency"] = parse_section(str(path), "latency", {
        k: v for k, v in latency.items() if k in _LATENCY_KEYS} if isinstance(latency, dict)
        else latency, LatencySpec)
    if meta.get("scheme", "fp32") not in QUANT_SCHEMES:
        raise ParetoslimError(f"{path}: scheme must be one of {list(QUANT_SCHEMES)}. Got "
                              f"{meta.get('scheme')!r}.")
    return meta


def recorded_task(meta: dict[str, Any]) -> tuple[str, Path, dict[str, Any]] | None:
    """The task an export recorded (reference, base directory, options), shown to a user
    deciding whether to trust it; None when it records none in the expected form."""
    task = meta.get("task")
    if not isinstance(task, dict):
        return None
    reference, base, options = task.get("reference"), task.get("base_dir"), task.get("options")
    if not isinstance(reference, str) or not isinstance(base, str):
        return None
    return reference, Path(base), options if isinstance(options, dict) else {}


def _task(root: Path, meta: dict[str, Any], task: Task | StudySpec | str | None,
          trust_recorded_task: bool) -> tuple[str, Task]:
    """The task to measure on and how it is referred to."""
    if isinstance(task, Task):
        return task.name or "<Task>", task
    if isinstance(task, StudySpec):
        return task.task, load_task(task.task, task.base_dir, task.task_options)
    if isinstance(task, str):
        return task, load_task(task, Path.cwd())
    reference, base, options = _recorded_or_refuse(root, meta, trust_recorded_task)
    return reference, load_task(reference, base, options)


def _recorded_or_refuse(root: Path, meta: dict[str, Any], trust_recorded_task: bool
                        ) -> tuple[str, Path, dict[str, Any]]:
    """The recorded task, when the user trusts it; else ParetoslimError saying what to pass."""
    found = recorded_task(meta)
    if not trust_recorded_task:
        named = (f"; it records the task {found[0]!r} with options {found[2]}, which "
                 "--trust-recorded-task would import and run") if found else ""
        raise ParetoslimError(
            f"{root}: verify runs no code named in an artifact: give the task to measure on "
            f"with --task REF or --spec FILE{named}")
    if found is None:
        raise ParetoslimError(f"{root / METRICS_FILE}: no task recorded; pass --task REF or "
                              "--spec FILE")
    return found


def _measure(model: Any, task: Task, meta: dict[str, Any], min_calls: int | None,
             tolerance: float) -> dict[str, Any]:
    latency: LatencySpec = meta["latency"]
    quality = quality_of(task, model)
    size = size_mb(model)
    x = latency_input(task, latency)
    task.model.eval()
    timing = run_isolated(LatencyJob(
        program=program_bytes(model, x), reference=program_bytes(task.model, x), example=x,
        scheme=meta.get("scheme", "fp32"), lowering=latency.lowering,
        threads=latency.threads, min_calls=min_calls or latency.min_calls,
        min_seconds=latency.min_seconds, max_spread=latency.max_spread)).timing
    recorded = meta["recorded"]
    keys = ("quality", "latency_ms", "size_mb", "speedup", "baseline_latency_ms",
            "latency_iqr_ms")
    shown = {k: v if isinstance(v := recorded.get(k), (int, float)) else None for k in keys}
    return {
        "quality": quality,
        "latency_ms": timing.model.median_ms,
        "latency_iqr_ms": timing.model.iqr_ms,
        "size_mb": size,
        "speedup": timing.speedup,
        "speedup_spread": timing.speedup_spread,
        "latency_noisy": timing.noisy,
        "baseline_latency_ms": timing.baseline.median_ms,
        "recorded": shown,
        "quality_ok": abs(quality - recorded["quality"]) <= tolerance,
        "tolerance": tolerance,
    }


def render_verification(result: dict[str, Any]) -> str:
    """A table of recorded vs re-measured figures and the verdict."""
    rec = result["recorded"]
    lines = [f"{'figure':<12}{'recorded':>12}{'now':>12}"]
    for key in ("quality", "latency_ms", "speedup", "size_mb"):
        fmt = FIGURE_FORMATS[key]
        before = fmt.format(rec[key]) if rec.get(key) is not None else "-"
        lines.append(f"{key:<12}{before:>12}{fmt.format(result[key]):>12}")
    verdict = ("quality matches" if result["quality_ok"] else "QUALITY DIFFERS")
    noisy = " (noisy)" if result["latency_noisy"] else ""
    lines.append(f"{verdict} (tolerance {result['tolerance']:g}); latency IQR now "
                 f"{result['latency_iqr_ms']:.3f} ms, speedup spread "
                 f"{result['speedup_spread']:.1%}{noisy}")
    return "\n".join(lines)
