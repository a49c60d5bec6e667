"""Running a study: the backends by name, each imported only when chosen."""

from __future__ import annotations

import importlib
from typing import NamedTuple, Protocol

import optuna

from ._errors import ParetoslimError
from ._signals import signals_as_interrupts
from ._spec import SEARCH_BACKENDS, StudySpec
from ._storage import is_rdb_url


class Backend(Protocol):
    """Runs trials of the spec's study (in ``storage``, default the spec's) until it holds
    ``target`` completed trials, and returns the study; ``address`` is a cluster's."""

    def __call__(self, spec: StudySpec, *, target: int, storage: str | None, progress: bool,
                 address: str | None = None) -> optuna.Study: ...


class _Import(NamedTuple):
    module: str
    function: str
    needs: str = ""  # what the module imports that is an extra, and the extra
    extra: str = ""


BACKEND_IMPORT: dict[str, _Import] = {
    "optuna": _Import("._local", "run_in_process"),
    "worker": _Import("._worker", "run_shared"),
    "ray": _Import("._ray", "run_ray_study", needs="Ray Tune", extra="ray"),
}


def get_backend(name: str, choices: tuple[str, ...] = tuple(BACKEND_IMPORT)) -> Backend:
    """The backend called ``name``, one of ``choices``; its module is imported now."""
    if name not in choices:
        raise ParetoslimError(f"--backend must be one of {list(choices)}. Got {name!r}.")
    found = BACKEND_IMPORT[name]
    try:
        module = importlib.import_module(found.module, __package__)
    except ImportError as exc:
        if not found.extra:
            raise
        raise ParetoslimError(f"the {name} backend needs {found.needs} ({exc}): pip install "
                              f"'paretoslim[{found.extra}]'") from None
    return getattr(module, found.function)


def _target(spec: StudySpec, trials: int | None) -> int:
    target = trials if trials is not None else spec.trials
    if target < 1:
        raise ParetoslimError(f"--trials must be >= 1. Got {target}.")
    return target


def run_study(spec: StudySpec, *, trials: int | None = None, storage: str | None = None,
              progress: bool = True, backend: str | None = None,
              address: str | None = None) -> optuna.Study:
    """Run the study until it holds ``trials`` (default: the spec's) completed trials.

    Resumes a stored study: completed trials are kept and only the missing ones run.
    Failed trials are recorded with their reason and do not count; the run stops after
    ``max(5, trials)`` failures in a row, so a broken task cannot loop forever. One run
    drives a study at a time (ParetoslimError while another live process does); SIGTERM
    and Ctrl-C raise KeyboardInterrupt, the running trial recorded as failed with why.
    ``backend`` (default: the spec's) is ``optuna`` (this process) or ``ray`` (Ray Tune,
    on the cluster at ``address``, default the spec's ``ray.address``).
    """
    target = _target(spec, trials)
    run = get_backend(backend or spec.backend, SEARCH_BACKENDS)
    with signals_as_interrupts():  # SIGTERM ends the run as Ctrl-C does
        return run(spec, target=target, storage=storage, progress=progress, address=address)


def run_worker(spec: StudySpec, storage: str | None = None, *, trials: int | None = None,
               progress: bool = True) -> optuna.Study:
    """Run trials of the spec's study as one of several workers sharing a database storage.

    Start any number of workers, on one or many machines, against the same storage URL
    (``storage``, else the spec's): the first creates the study, all of them sample from it
    and stop when it holds ``trials`` (default: the spec's) completed trials. A worker that
    dies stops sending heartbeats; after ``workers.grace_s`` its trial is failed and its
    recipe retried by another worker.
    """
    location = storage or spec.storage
    if not location or not is_rdb_url(location):
        raise ParetoslimError(
            "a worker needs a database storage shared by all workers, e.g. --storage "
            f"postgresql://USER:PASSWORD@HOST/DB. Got {location or 'none'!r}.")
    target = _target(spec, trials)
    with signals_as_interrupts():
        return get_backend("worker")(spec, target=target, storage=location, progress=progress)
