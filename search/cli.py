"""The ``paretoslim`` command line: run, front, export."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence

from ._errors import ParetoslimError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paretoslim",
        description="Search pruning, quantization, low-rank and distillation jointly for a "
                    "PyTorch model; inspect the Pareto front; export a configuration.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    run = verbs.add_parser("run", help="run or resume a study, then print its front")
    run.add_argument("spec", metavar="SPEC", help="study spec (TOML)")
    run.add_argument("--trials", type=int, help="completed trials to reach (default: spec)")
    run.add_argument("--storage", help="Optuna storage URL or journal file path")
    run.add_argument("--quiet", action="store_true", help="no progress display")

    front = verbs.add_parser("front", help="print the Pareto front of a study")
    front.add_argument("study", metavar="STUDY", help="spec path or study name")
    front.add_argument("--storage", help="Optuna storage URL or journal file path")
    front.add_argument("--format", default="table", choices=("table", "csv", "json"))
    front.add_argument("--sort", help="column to sort the table by (e.g. latency_ms)")
    front.add_argument("--all", action="store_true", dest="all_trials",
                       help="every trial, with the reason of failed ones")

    export = verbs.add_parser("export", help="write a trial's compressed model, recipe, card")
    export.add_argument("study", metavar="STUDY", help="spec path or study name")
    export.add_argument("--trial", type=int, required=True, help="trial number")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--storage", help="Optuna storage URL or journal file path")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # torchao reports its CUDA-only libraries, torch a deprecation inside torchao: not ours
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        if args.verb == "run":
            return _run(args)
        if args.verb == "front":
            return _front(args)
        if args.verb == "export":
            return _export(args)
    except ParetoslimError as exc:
        print(f"paretoslim: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("paretoslim: interrupted; completed trials are stored, run the same command "
              "again to resume", file=sys.stderr)
        return 130
    return 0


def _run(args: argparse.Namespace) -> int:
    from ._front import render_front
    from ._spec import load_spec
    from ._study import run_study, storage_of

    spec = load_spec(args.spec)
    study = run_study(spec, trials=args.trials, storage=args.storage, progress=not args.quiet)
    print(f"\nPareto front of study {spec.name!r} ({storage_of(spec, args.storage)}):")
    print(render_front(study))
    return 0


def _front(args: argparse.Namespace) -> int:
    from ._front import render_front
    from ._study import resolve_study

    study, _ = resolve_study(args.study, args.storage)
    print(render_front(study, args.format, sort=args.sort, all_trials=args.all_trials))
    return 0


def _export(args: argparse.Namespace) -> int:
    from ._export import export_trial
    from ._study import resolve_study

    study, spec = resolve_study(args.study, args.storage)
    out = export_trial(study, spec, args.trial, args.out)
    print(f"exported trial {args.trial} of study {study.study_name!r} to {out}/ "
          "(model.pt2, recipe.json, metrics.json, card.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
