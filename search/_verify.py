"""Verification of an exported artifact: reload it safely and re-measure it on this machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..evaluators import LatencyJob, program_bytes, run_isolated, size_mb
from ._errors import ParetoslimError
from ._export import METRICS_FILE, MODEL_FILE, load_program
from ._figures import FIGURE_FORMATS
from ._task import load_task
from ._trial import latency_input, quality_of

DEFAULT_TOLERANCE = 0.002


def verify_artifact(directory: str | Path, *, tolerance: float = DEFAULT_TOLERANCE,
                    min_calls: int | None = None) -> dict[str, Any]:
    """Re-measure an exported trial: quality on the task's held-out data, size, and latency.

    Latency is timed interleaved with the teacher lowered to fp32, in a fresh process, as
    during the search.
    Returns ``quality``, ``latency_ms``, ``size_mb``, ``speedup``, ``baseline_latency_ms``,
    ``recorded`` (the search-time figures), ``quality_ok`` (quality within ``tolerance`` of
    the recorded one) and ``tolerance``. Raises ParetoslimError for a directory that is not
    an export or whose task cannot be loaded.
    """
    root = Path(directory)
    meta_path, model_path = root / METRICS_FILE, root / MODEL_FILE
    if not meta_path.is_file() or not model_path.is_file():
        raise ParetoslimError(
            f"{root}: not an exported trial (needs {METRICS_FILE} and {MODEL_FILE}; "
            "create one with `paretoslim export`)")
    meta = json.loads(meta_path.read_text())
    task_info, latency = meta.get("task"), meta.get("latency", {})
    if not task_info:
        raise ParetoslimError(f"{meta_path}: no task recorded; export the trial again")
    task = load_task(task_info["reference"], Path(task_info["base_dir"]),
                     task_info.get("options") or {})
    try:
        model = load_program(model_path)
    except Exception as exc:
        raise ParetoslimError(
            f"{model_path}: cannot be loaded safely ({type(exc).__name__}: {exc})") from None

    quality = quality_of(task, model)
    size = size_mb(model)
    x = latency_input(task, latency.get("batch_size", 0))
    task.model.eval()
    timing = run_isolated(LatencyJob(
        program=program_bytes(model, x), reference=program_bytes(task.model, x), example=x,
        scheme=meta.get("scheme", "fp32"), lowering=latency.get("lowering", "aoti"),
        threads=latency.get("threads", 1),
        min_calls=min_calls or latency.get("min_calls", 300),
        min_seconds=latency.get("min_seconds", 1.0),
        max_spread=latency.get("max_spread", 0.05))).timing
    recorded = meta.get("recorded", {})
    keys = ("quality", "latency_ms", "size_mb", "speedup", "baseline_latency_ms",
            "latency_iqr_ms")
    return {
        "quality": quality,
        "latency_ms": timing.model.median_ms,
        "latency_iqr_ms": timing.model.iqr_ms,
        "size_mb": size,
        "speedup": timing.speedup,
        "speedup_spread": timing.speedup_spread,
        "latency_noisy": timing.noisy,
        "baseline_latency_ms": timing.baseline.median_ms,
        "recorded": {k: recorded.get(k) for k in keys},
        "quality_ok": abs(quality - recorded.get("quality", float("nan"))) <= tolerance,
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
