"""``paretoslim bench``: the kernel benchmark and the ahead-of-time latency model of a target."""

from __future__ import annotations

import argparse
import json

from ._errors import ParetoslimError
from ._spec import MAX_THREADS


def run_bench(args: argparse.Namespace) -> int:
    """``paretoslim bench kernels|latency``; returns the exit status."""
    from ..evaluators import render_bench, run_kernel_bench

    if args.what == "latency":
        return _bench_latency(args)
    if args.spec is not None:
        raise ParetoslimError("bench kernels takes no SPEC")
    if not 1 <= args.threads <= MAX_THREADS:
        raise ParetoslimError(f"--threads must be in [1, {MAX_THREADS}]. Got {args.threads}.")
    rows = run_kernel_bench(threads=args.threads, quick=args.quick,
                            progress=args.format == "table")
    print(render_bench(rows, args.format))
    return 0


def _bench_latency(args: argparse.Namespace) -> int:
    from ._candidates import CandidateTier
    from ._measuring import measure_baseline
    from ._progress import StudyProgress
    from ._record import json_safe
    from ._spec_file import load_spec
    from ._task import load_task

    if args.spec is None:
        raise ParetoslimError("bench latency needs a study SPEC: its task, space and "
                              "[latency] target")
    spec = load_spec(args.spec)
    task = load_task(spec.task, spec.base_dir, spec.task_options)
    progress = StudyProgress(target=1, completed=0, enabled=args.format == "table")
    try:
        tier = CandidateTier(spec, task, measure_baseline(task), progress)
        model = tier.prepare_latency()
    finally:
        progress.close()
    report = model.error_report()
    figures = {"key": model.key, "path": str(tier.latency_path), "layers": len(model.table),
               "measurements": report.count, "median_error": report.median,
               "p90_error": report.p90, "kendall_tau": report.kendall_tau}
    if args.format == "json":
        print(json.dumps(json_safe(figures)))
        return 0
    print(f"latency model {model.key}\n  {len(model.table)} layer calls micro-timed, "
          f"saved at {tier.latency_path}")
    if report.count >= 3:
        print(f"  {report.count} full measurements; leave-one-out error: median "
              f"{report.median:.1%}, p90 {report.p90:.1%}, Kendall tau {report.kendall_tau:.2f}")
    else:
        print(f"  {report.count} full measurements: its error is known once studies on this "
              "target have measured three trials")
    return 0
