"""The ``paretoslim`` command line: run, worker, front, pick, export, verify, report, dashboard,
bench."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import warnings
from collections.abc import Callable, Sequence

from ._errors import ParetoslimError
from ._verify import DEFAULT_TOLERANCE


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line too, like every other bad input (status 2)."""

    def error(self, message: str):
        verb = self.prog.removeprefix("paretoslim").strip()
        self.exit(2, f"paretoslim: error: {verb + ': ' if verb else ''}"
                     f"{' '.join(message.split())} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="paretoslim",
        description="Search pruning, quantization, low-rank and distillation jointly for a "
                    "PyTorch model; inspect the Pareto front; export a configuration.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _add_search_verbs(verbs.add_parser)
    _add_view_verbs(verbs.add_parser)

    bench = verbs.add_parser("bench", help="benchmarks of this machine")
    bench.add_argument("what", choices=("kernels", "latency"),
                       help="kernels: GOP/s of each GEMM path against the CPU's peak; "
                       "latency: build the latency model of SPEC's target ahead of a study")
    bench.add_argument("spec", nargs="?", metavar="SPEC", help="study spec (latency)")
    bench.add_argument("--format", default="table", choices=("table", "json"))
    bench.add_argument("--threads", type=int, default=1)
    bench.add_argument("--quick", action="store_true", help="small shapes, a few seconds")

    dashboard = verbs.add_parser("dashboard", help="optuna-dashboard on 127.0.0.1")
    _add_study(dashboard)
    dashboard.add_argument("--port", type=int, default=8080, help="1-65535 (default 8080)")
    return parser


def _add_search_verbs(add: Callable[..., argparse.ArgumentParser]) -> None:
    run = add("run", help="run or resume a study, then print its front")
    run.add_argument("spec", metavar="SPEC", help="study spec (TOML)")
    run.add_argument("--trials", type=int, help="completed trials to reach (default: spec)")
    run.add_argument("--time-budget", type=float, metavar="SECONDS",
                     help="start no trial after this many seconds (default: the spec's "
                          "time_budget_s)")
    run.add_argument("--storage", help="Optuna storage URL or journal file path")
    run.add_argument("--backend", choices=("optuna", "ray"),
                     help="optuna: trials in this process; ray: trials on a Ray cluster "
                          "(default: the spec's)")
    run.add_argument("--address", help="Ray cluster address: HOST:PORT or auto "
                                       "(default: the spec's ray.address; empty: start Ray "
                                       "on this machine)")
    run.add_argument("--quiet", action="store_true", help="no progress display")

    worker = add("worker", help="run trials of a study shared by many workers through a "
                                "database")
    worker.add_argument("spec", metavar="SPEC", help="study spec (TOML)")
    worker.add_argument("--storage", help="database URL shared by the workers, e.g. "
                                          "postgresql://USER:PASSWORD@HOST/DB "
                                          "(default: the spec's)")
    worker.add_argument("--trials", type=int, help="completed trials the study should reach "
                                                   "(default: spec)")
    worker.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="start no trial after this many seconds (default: the spec's "
                             "time_budget_s)")
    worker.add_argument("--quiet", action="store_true", help="no progress display")


def _add_view_verbs(add: Callable[..., argparse.ArgumentParser]) -> None:
    front = add("front", help="print the Pareto front of a study")
    _add_study(front)
    front.add_argument("--format", default="table",
                       choices=("table", "csv", "json", "parquet"))
    front.add_argument("--sort", help="column to sort by (e.g. latency_ms, speedup)")
    front.add_argument("--all", action="store_true", dest="all_trials",
                       help="every trial, with the reason of failed ones")
    front.add_argument("--out", help="write to this file instead of printing "
                                     "(required for parquet)")

    pick = add("pick", help="choose one trial by a rule and say why")
    _add_study(pick)
    _add_pick_rule(pick)
    pick.add_argument("--format", default="text", choices=("text", "json"))

    export = add("export", help="write a trial's compressed model, recipe, card")
    _add_study(export)
    which = export.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=int, help="trial number")
    which.add_argument("--pick", action="store_true",
                       help="the trial chosen by the pick options below")
    export.add_argument("--out", required=True, help="output directory")
    _add_pick_rule(export)

    verify = add("verify", help="reload an export and re-measure it here (on your task: "
                                "nothing named in the artifact is run)")
    verify.add_argument("directory", metavar="DIR", help="directory written by export")
    task = verify.add_mutually_exclusive_group()
    task.add_argument("--task", metavar="REF", help="the task to measure on: "
                      "path/to/file.py:make_task or package.module:make_task")
    task.add_argument("--spec", metavar="FILE", help="the study spec whose task (and task "
                                                     "options) to measure on")
    task.add_argument("--trust-recorded-task", action="store_true",
                      help="import and run the task named in DIR/metrics.json (shown first)")
    verify.add_argument("--format", default="table", choices=("table", "json"))
    verify.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest accepted quality difference (default {DEFAULT_TOLERANCE})")

    report = add("report", help="self-contained HTML report of a study")
    _add_study(report)
    report.add_argument("--out", required=True, help="HTML file to write")
    report.add_argument("--no-png", action="store_true", help="skip the PNG of the front")


def _add_study(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY", help="spec path or study name")
    parser.add_argument("--storage", help="Optuna storage URL or journal file path")


def _add_pick_rule(parser: argparse.ArgumentParser) -> None:
    rule = parser.add_argument_group("pick rule")
    rule.add_argument("--max-quality-drop", type=float,
                      help="largest quality loss vs the teacher (default: the study's)")
    rule.add_argument("--max-latency-ms", type=float)
    rule.add_argument("--max-size-mb", type=float)
    goal = rule.add_mutually_exclusive_group()
    goal.add_argument("--minimize", metavar="FIGURE",
                      help="figure to minimize (default: latency_ms)")
    goal.add_argument("--maximize", metavar="FIGURE", help="figure to maximize")
    goal.add_argument("--knee", action="store_true", help="the knee of the front")


def _rule(args: argparse.Namespace):
    from ._pick import PickRule

    return PickRule(max_quality_drop=args.max_quality_drop, max_latency_ms=args.max_latency_ms,
                    max_size_mb=args.max_size_mb, minimize=args.minimize,
                    maximize=args.maximize, knee=args.knee)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status.

    0: done; 1: ``verify`` found a quality difference; 2: bad input (one line on stderr);
    130 / 143: interrupted by SIGINT (Ctrl-C) / SIGTERM.
    """
    from ._signals import interrupt_status, interrupted_by, signals_as_interrupts

    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # torchao reports its CUDA-only libraries, torch a deprecation inside torchao: not ours
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    handler = {"run": _run, "worker": _worker, "front": _front, "pick": _pick,
               "export": _export, "verify": _verify, "report": _report,
               "dashboard": _dashboard, "bench": _bench}[args.verb]
    try:
        with signals_as_interrupts():
            return handler(args)
    except ParetoslimError as exc:
        print(f"paretoslim: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0
    except OSError as exc:  # e.g. an --out file in a folder that does not exist
        where = f": {exc.filename}" if exc.filename else ""
        print(f"paretoslim: error: {exc.strerror or ' '.join(str(exc).split())}{where}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = ("; completed trials are stored, run the same command again to resume"
                  if args.verb in ("run", "worker") else "")
        print(f"paretoslim: interrupted by {interrupted_by()}{resume}", file=sys.stderr)
        return interrupt_status()


def _run(args: argparse.Namespace) -> int:
    from ._front import render_front
    from ._run import run_study
    from ._spec_file import load_spec
    from ._storage import shown, storage_of

    spec = _budgeted(load_spec(args.spec), args.time_budget)
    study = run_study(spec, trials=args.trials, storage=args.storage, progress=not args.quiet,
                      backend=args.backend, address=args.address)
    print(f"\nPareto front of study {spec.name!r} ({shown(storage_of(spec, args.storage))}):")
    print(render_front(study))
    return 0


def _budgeted(spec, seconds: float | None):
    """``spec`` with ``--time-budget`` in place of its own, when given."""
    if seconds is None:
        return spec
    try:
        return dataclasses.replace(spec, time_budget_s=seconds)
    except ValueError as exc:
        raise ParetoslimError(f"--time-budget: {exc}") from None


def _worker(args: argparse.Namespace) -> int:
    from ._run import run_worker
    from ._spec_file import load_spec
    from ._store import StudyStore

    spec = _budgeted(load_spec(args.spec), args.time_budget)
    study = run_worker(spec, args.storage, trials=args.trials, progress=not args.quiet)
    print(f"study {spec.name!r}: {StudyStore(study).completed_count()} completed trials")
    return 0


def _front(args: argparse.Namespace) -> int:
    from ._front import render_front, write_front

    study, _ = _readable(args)
    candidates = _candidates(args) if args.all_trials else None
    if args.out:
        write_front(study, args.out, args.format, sort=args.sort, all_trials=args.all_trials,
                    candidates=candidates)
        print(f"wrote {args.out}")
        return 0
    if args.format == "parquet":
        raise ParetoslimError("--format parquet writes a file: add --out FILE.parquet")
    print(render_front(study, args.format, sort=args.sort, all_trials=args.all_trials,
                       candidates=candidates))
    return 0


def _pick(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from ._pick import pick

    study, _ = _readable(args)
    chosen = pick(study, _rule(args))
    if args.format == "json":
        print(json.dumps({**asdict(chosen.point), "reason": chosen.reason}, indent=2))
    else:
        print(chosen.reason)
    return 0


def _export(args: argparse.Namespace) -> int:
    from ._export import export_trial

    study, spec = _readable(args)
    number = args.trial
    if args.pick:
        from ._pick import pick

        chosen = pick(study, _rule(args))
        print(f"picked {chosen.reason}")
        number = chosen.point.number
    out = export_trial(study, spec, number, args.out)
    print(f"exported trial {number} of study {study.study_name!r} to {out}/ "
          f"({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ._export import METRICS_FILE
    from ._spec_file import load_spec
    from ._verify import read_metrics, recorded_task, render_verification, verify_artifact

    task = args.task or (load_spec(args.spec) if args.spec else None)
    if args.trust_recorded_task:
        meta_path = Path(args.directory) / METRICS_FILE
        found = recorded_task(read_metrics(meta_path)) if meta_path.is_file() else None
        if found is not None:
            print(f"paretoslim: trusting the task recorded in {meta_path}: {found[0]!r} in "
                  f"{found[1]} with options {found[2]}", file=sys.stderr)
    result = verify_artifact(args.directory, task, trust_recorded_task=args.trust_recorded_task,
                             tolerance=args.tolerance)
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        print(render_verification(result))
    return 0 if result["quality_ok"] else 1


def _report(args: argparse.Namespace) -> int:
    from ._report import write_report

    study, _ = _readable(args)
    written = write_report(study, args.out, png=not args.no_png, warn=_warn)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _warn(message: str) -> None:
    print(f"paretoslim: warning: {' '.join(message.split())}", file=sys.stderr)


def _candidates(args: argparse.Namespace):
    """The readable copy of the named study's predicted tier (None: it has none)."""
    from ._study import resolve_candidates

    return resolve_candidates(args.study, args.storage, _warn)


def _readable(args: argparse.Namespace):
    """The study a read-only verb names, as a readable in-memory copy, and its spec."""
    from ._study import resolve_readable

    return resolve_readable(args.study, args.storage, _warn)


def _bench(args: argparse.Namespace) -> int:
    from ._bench_verb import run_bench

    return run_bench(args)


def _dashboard(args: argparse.Namespace) -> int:
    from ._dashboard import serve_dashboard

    serve_dashboard(args.study, args.storage, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
