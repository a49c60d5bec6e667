"""Drivers of a compression search: task, study spec, backends, front, export, CLI."""

if "." not in __name__:  # this folder, imported by its own name from a checkout on sys.path
    from paretoslim.spaces._aside import step_aside

    __package__ = step_aside(__name__, __path__[0])

from ._errors import ParetoslimError
from ._export import export_trial
from ._front import render_front, write_front
from ._measuring import Baseline, measure_baseline
from ._pareto import FrontPoint, pareto_front
from ._pick import Pick, PickRule, pick
from ._record import TrialResult
from ._report import write_report
from ._run import run_study, run_worker
from ._spec import OBJECTIVES, FinetuneSpec, LatencySpec, StudySpec
from ._spec_file import load_spec, parse_spec
from ._study import open_study, resolve_study
from ._task import Task, load_task
from ._trial import TrialSettings, run_trial
from ._verify import verify_artifact

__all__ = [
    "OBJECTIVES",
    "Baseline",
    "FinetuneSpec",
    "FrontPoint",
    "LatencySpec",
    "ParetoslimError",
    "Pick",
    "PickRule",
    "StudySpec",
    "Task",
    "TrialResult",
    "TrialSettings",
    "export_trial",
    "load_spec",
    "load_task",
    "measure_baseline",
    "open_study",
    "pareto_front",
    "parse_spec",
    "pick",
    "render_front",
    "resolve_study",
    "run_study",
    "run_trial",
    "run_worker",
    "verify_artifact",
    "write_front",
    "write_report",
]
