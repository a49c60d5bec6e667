"""The study records every backend writes and every view reads: storages, opening and finding a
study, the attributes of a trial (recipe, metrics, failure), reuse of a repeated recipe."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..spaces import Recipe
from ._errors import ParetoslimError
from ._journal import repair_torn_tail, warn_torn_tail
from ._journal import unreadable as journal_unreadable
from ._private import fail_trial, finish_trial
from ._sampling import make_sampler
from ._spec import StudySpec, WorkerSpec, check_study_name, load_spec
from ._stopping import RungPoint
from ._trial import LATENCY_FIGURES, Guide, TrialResult

# user attributes of a trial
RECIPE_ATTR = "recipe"
METRICS_ATTR = "metrics"
VALUES_ATTR = "values"  # the objective values, written last: the trial's result is complete
FAILURE_ATTR = "fail_reason"
STOPPED_ATTR = "stopped"  # why a trial was stopped early (it is PRUNED)
DUPLICATE_ATTR = "duplicate_of"
WORKER_ATTR = "worker"
HEARTBEAT_ATTR = "sends_heartbeats"
# user attributes of a study
SPEC_ATTR = "spec"
TARGET_ATTR = "target_trials"

JOURNAL_LOCK_GRACE_S = 30  # a journal lock kept this long (its writer was killed) is taken over
_URL_SCHEMES = ("sqlite:", "postgresql", "mysql", "oracle", "mssql")
_CREATION_LOCK_KEY = 0x70617265746F  # "pareto": the advisory lock serializing creation


def is_rdb_url(location: str) -> bool:
    """Whether ``location`` is an SQLAlchemy database URL (else a journal file path)."""
    return location.startswith(_URL_SCHEMES)


def database_url(url: str) -> str:
    """``url`` with a driver SQLAlchemy can load: ``postgresql://`` means psycopg 3 to
    SQLAlchemy 2.1, the ``postgres`` extra installs psycopg2; use it when psycopg is absent."""
    if (url.startswith(("postgresql://", "postgres://"))
            and importlib.util.find_spec("psycopg") is None
            and importlib.util.find_spec("psycopg2") is not None):
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


_SECRET_QUERY = re.compile(r"([?&](?:password|passwd|pwd|pass|secret|token|sslpassword|"
                           r"access_token|api_key|apikey)=)[^&#]*", re.IGNORECASE)


def _url_parts(location: str) -> tuple[str, str | None, str | None, str, str] | None:
    """``(scheme, user, password, host and path, query)`` of a URL, None for a path. The
    user is None without credentials, the password None without a ':' in them; it runs
    from that first ':' to the last '@' before the query."""
    if "://" not in location:
        return None
    scheme, rest = location.split("://", 1)
    end = min((rest.index(mark) for mark in "?#" if mark in rest), default=len(rest))
    rest, query = rest[:end], rest[end:]
    credentials, at, host = rest.rpartition("@")
    if not at:
        return scheme, None, None, rest, query
    user, colon, password = credentials.partition(":")
    return scheme, user, password if colon else None, host, query


def shown(location: str) -> str:
    """A storage as it may be printed: a database URL without its password, whatever form
    it takes (``user:pass@``, a password holding ``/`` or ``@``, ``?password=`` and the
    like in the query)."""
    parts = _url_parts(location)
    if parts is None:
        return location
    scheme, user, password, host, query = parts
    credentials = "" if user is None else f"{user}:***@" if password is not None else f"{user}@"
    return (f"{scheme}://{credentials}{host}"
            f"{_SECRET_QUERY.sub(lambda m: m.group(1) + '***', query)}")


def sqlite_file(location: str) -> Path | None:
    """The database file of an SQLite URL (None: in memory, or not SQLite)."""
    if not location.startswith("sqlite"):
        return None
    import sqlalchemy

    try:
        database = sqlalchemy.engine.make_url(location).database
    except sqlalchemy.exc.ArgumentError:
        return None
    return None if database in (None, "", ":memory:") else Path(database)


@contextlib.contextmanager
def storage_errors(location: str, *, writing: bool = False) -> Iterator[None]:
    """Turn a storage that cannot be used into one ParetoslimError naming it (no password).

    ``writing``: a run writes through it; an OS or database error anywhere in the chain of
    what was raised (Optuna re-raises a failed write as its own error) ends the run saying
    that what was recorded is kept."""
    try:
        yield
    except ParetoslimError:
        raise
    except Exception as exc:
        cause = _write_failure(exc) if writing else None
        if cause is None:
            with _storage_errors(location):
                raise
        raise ParetoslimError(
            f"storage {shown(location)}: a write failed ({_first_line(cause, location)}); the "
            "run stopped and every trial recorded before is kept: free space or repair the "
            "storage, then run the same command again to resume") from None


def _write_failure(exc: BaseException) -> BaseException | None:
    """The OS or database error in the chain of ``exc`` (itself included), or None."""
    import sqlalchemy

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (OSError, sqlalchemy.exc.OperationalError)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def _storage_errors(location: str) -> Iterator[None]:
    try:
        yield
    except ParetoslimError:
        raise
    except ImportError as exc:
        raise ParetoslimError(
            f"storage {shown(location)}: its database driver is missing ({exc}); for "
            "PostgreSQL: pip install 'paretoslim[postgres]'") from None
    except OSError as exc:
        raise ParetoslimError(f"storage {shown(location)}: {_first_line(exc)}") from None
    except Exception as exc:
        import sqlalchemy

        if not isinstance(exc, (sqlalchemy.exc.SQLAlchemyError,
                                optuna.exceptions.StorageInternalError)):
            raise
        cause = getattr(exc, "orig", None) or exc.__cause__ or exc
        raise ParetoslimError(
            f"cannot use the storage {shown(location)}: {_first_line(cause, location)}"
        ) from None


def _first_line(exc: BaseException, location: str = "") -> str:
    """The first line of an error's message, its storage's password hidden."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    text = shown(lines[0])
    for secret in _secrets(location):
        text = text.replace(secret, "***")
    return text


def _secrets(location: str) -> list[str]:
    """The password-like parts of a storage URL, as written and as URL-decoded."""
    from urllib.parse import unquote

    parts = _url_parts(location)
    if parts is None:
        return []
    found = [parts[2] or ""] + [m.group(0).split("=", 1)[1]
                                for m in _SECRET_QUERY.finditer(parts[4])]
    return [v for s in found if s for v in {s, unquote(s)} if len(v) >= 3]


def check_storage(location: str, *, create: bool) -> None:
    """Raise ParetoslimError for an SQLite file that cannot be (``create``) or is not there:
    read-only verbs must not create an empty database, SQLite does not create directories."""
    path = sqlite_file(location)
    if path is None:
        return
    if not create and not path.is_file():
        raise ParetoslimError(f"storage {shown(location)}: the database {path} does not exist "
                              "(run `paretoslim run SPEC --storage URL` first)")
    if create and not path.parent.is_dir():
        raise ParetoslimError(f"storage {shown(location)}: the directory {path.parent} does "
                              "not exist; create it first")


def make_storage(url_or_path: str, workers: WorkerSpec | None = None, *,
                 writable: bool = True) -> Any:
    """An Optuna storage: an RDB URL as is, anything else a journal file path.

    With ``workers``, an RDB storage whose running trials send heartbeats; a trial silent
    for the grace period is failed and retried by the next worker that starts a trial.
    A journal's torn last line (a write cut short) is cut off first when ``writable``, else
    ignored with a warning; a journal Optuna cannot replay raises ParetoslimError saying
    where it is damaged. Not ``writable``: a database without Optuna's tables is refused
    instead of having them created.
    """
    if is_rdb_url(url_or_path):
        if not writable:
            _check_optuna_tables(url_or_path)
        url = database_url(url_or_path)
        if workers is None:
            return url
        from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

        retry = RetryHeartbeatStaleTrialCallback(max_retry=workers.max_retries)
        return RDBStorage(url, heartbeat_interval=workers.heartbeat_s,
                          grace_period=workers.grace_s, heartbeat_stale_trial_callback=retry,
                          engine_kwargs={"pool_pre_ping": True})
    # absolute: the lock is a symbolic link to the journal, and a relative link would
    # dangle, so a lock left by a killed writer would never be released
    path = Path(url_or_path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    lock = JournalFileSymlinkLock(str(path), grace_period=JOURNAL_LOCK_GRACE_S)
    if writable:
        repair_torn_tail(path, lock)
    else:
        warn_torn_tail(path)
    try:
        return JournalStorage(JournalFileBackend(str(path), lock))
    except OSError:
        raise
    except Exception as exc:  # replaying the records: anything raised is about the data
        raise journal_unreadable(path, exc) from None


def _check_optuna_tables(url: str) -> None:
    """Raise ParetoslimError unless the database at ``url`` holds Optuna's tables (looked up
    without writing; opening it through Optuna would create them)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(database_url(url), poolclass=sqlalchemy.pool.NullPool)
    try:
        names = set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    if not {"studies", "trials", "version_info"} <= names:
        raise ParetoslimError(f"storage {shown(url)} holds no Optuna study tables; nothing "
                              "was written to it (run `paretoslim run SPEC --storage URL` "
                              "to create a study there)")


def storage_of(spec: StudySpec, override: str | None = None) -> str:
    """The storage a spec's study lives in: ``override``, the spec's, or runs/NAME/journal.log."""
    return override or spec.storage or str(spec.default_storage_path())


def _spec_record(spec: StudySpec) -> dict[str, Any]:
    path = str(spec.path.resolve()) if spec.path is not None else None
    return {"path": path, "name": spec.name, "objectives": list(spec.objectives),
            "max_quality_drop": spec.constraints.max_quality_drop}


def open_study(spec: StudySpec, storage: str | None = None, *,
               workers: WorkerSpec | None = None,
               sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    """Create the spec's study or load it if it exists (same name, same objectives).

    Safe when several processes open a new database study at the same moment: creation is
    serialized (a PostgreSQL advisory lock, else retries), so none crashes on the schema.
    A storage that cannot be used raises ParetoslimError naming it.
    """
    location = storage_of(spec, storage)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are reported by paretoslim
    check_storage(location, create=True)
    try:
        with storage_errors(location):
            study = _create_once(location, lambda: optuna.create_study(
                study_name=spec.name, storage=make_storage(location, workers),
                directions=spec.directions, sampler=sampler or make_sampler(spec),
                load_if_exists=True))
    except ValueError as exc:
        raise ParetoslimError(
            f"study {spec.name!r} in {shown(location)}: {exc} (the objectives changed? use a "
            "new study name or storage)"
        ) from None
    if study.directions and [d.name.lower() for d in study.directions] != spec.directions:
        raise ParetoslimError(
            f"study {spec.name!r} in {shown(location)} was created with other objectives; use "
            "a new study name or storage"
        )
    if SPEC_ATTR not in study.user_attrs:
        study.set_user_attr(SPEC_ATTR, _spec_record(spec))
    return study


def _create_once(location: str, create: Any) -> optuna.Study:
    """Run ``create`` so that concurrent first workers do not race on schema creation."""
    if not is_rdb_url(location):
        return create()  # journal files append under a file lock: no race
    if location.startswith("postgres"):
        return _create_locked(location, create)
    import random
    import time

    import sqlalchemy

    for attempt in range(6):  # other databases: back off and retry a lost creation race
        try:
            return create()
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            if attempt == 5 or "unable to open" in str(exc):  # a race, not a bad location
                raise
            time.sleep(random.uniform(0.2, 1.0) * (attempt + 1))
    raise AssertionError("unreachable")


def _create_locked(location: str, create: Any) -> optuna.Study:
    """Run ``create`` holding a PostgreSQL advisory lock."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(database_url(location), poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"),
                               {"key": _CREATION_LOCK_KEY})
            try:
                return create()
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"),
                                   {"key": _CREATION_LOCK_KEY})
    finally:
        engine.dispose()


def resolve_study(ref: str, storage: str | None = None) -> tuple[optuna.Study, StudySpec | None]:
    """Find a stored study by spec path (``*.toml``) or by name under ``runs/``.

    Returns the study and its spec when the spec file can still be read. Creates nothing:
    a storage that does not exist or cannot be reached raises ParetoslimError.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec: StudySpec | None = None
    if ref.endswith(".toml"):
        spec = load_spec(ref)
        name, location = spec.name, storage_of(spec, storage)
    else:
        name = ref
        try:
            check_study_name(name)
        except ValueError as exc:
            raise ParetoslimError(f"no study {name!r}: the study {exc}") from None
        location = storage or str(Path("runs") / name / "journal.log")
    if not is_rdb_url(location) and not Path(location).is_file():
        raise ParetoslimError(
            f"no study {name!r}: {location} does not exist (run `paretoslim run SPEC` first, "
            "or pass --storage)"
        )
    check_storage(location, create=False)
    with storage_errors(location):
        study = _load_study(name, location)
    if spec is None:
        path = study.user_attrs.get(SPEC_ATTR, {}).get("path")
        if path and os.path.isfile(path):
            spec = load_spec(path)
    return study, spec


def _load_study(name: str, location: str) -> optuna.Study:
    storage = make_storage(location, writable=False)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise ParetoslimError(
            f"no study named {name!r} in {shown(location)}; studies there: {names or 'none'}"
        ) from None


def objective_names(study: optuna.Study) -> list[str]:
    """The study's objectives, in order, as its spec named them."""
    return list(study.user_attrs.get(SPEC_ATTR, {}).get("objectives") or
                ["quality", "latency_ms", "size_mb"][: len(study.directions)])


def completed_count(study: optuna.Study) -> int:
    """How many trials of ``study`` completed with a recipe of their own (a trial that
    repeated an earlier recipe and copied its figures is not counted)."""
    return sum(DUPLICATE_ATTR not in t.user_attrs
               for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def outcome_of(trial: FrozenTrial) -> str:
    """What a finished trial brought: ``new`` (a recipe completed), ``repeat`` (an earlier
    recipe's figures or stop copied), ``stopped`` or ``failed``."""
    if DUPLICATE_ATTR in trial.user_attrs:
        return "repeat"
    return {TrialState.COMPLETE: "new", TrialState.PRUNED: "stopped"}.get(trial.state,
                                                                            "failed")


def fail_running(study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
    """Record a trial its process left running as failed, saying why."""
    fail_trial(study, trial, FAILURE_ATTR, reason)


def settle_running(study: optuna.Study, trial: FrozenTrial, reason: str) -> TrialState:
    """Finish a trial its process left running as far as it got; return the state given.

    A trial whose result was recorded in full (its values are written last) is completed
    with it, one stopped early is pruned, one with a failure reason fails with it; any
    other fails with ``reason``.
    """
    attrs = trial.user_attrs
    values = attrs.get(VALUES_ATTR)
    if (METRICS_ATTR in attrs and isinstance(values, list)
            and len(values) == len(study.directions)
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
        finish_trial(study, trial, TrialState.COMPLETE, [float(v) for v in values])
        return TrialState.COMPLETE
    if attrs.get(STOPPED_ATTR):
        finish_trial(study, trial, TrialState.PRUNED)
        return TrialState.PRUNED
    fail_running(study, trial, attrs.get(FAILURE_ATTR) or reason)
    return TrialState.FAIL


def mark_interrupted(study: optuna.Study) -> dict[str, int]:
    """Finish the trials a killed process left running (see ``settle_running``); return
    how many ended in each state (``complete``, ``pruned``, ``fail``).

    Call it only holding the study's lease (``_lease``): then no live process runs them.
    Trials of ``worker`` processes are left alone: they may still be running, and a
    worker's trial that stops sending heartbeats is failed and retried by the workers.
    """
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(HEARTBEAT_ATTR):
            continue
        state = settle_running(
            study, trial, "interrupted: the process running this trial ended before it finished")
        counts[state.name.lower()] = counts.get(state.name.lower(), 0) + 1
    return counts


def settled_note(counts: dict[str, int]) -> str:
    """What ``mark_interrupted`` did, as a sentence ("" when nothing was left running)."""
    if not counts:
        return ""
    said = {"complete": "completed from their recorded results", "pruned": "recorded as "
            "stopped early", "fail": "recorded as failed"}
    parts = [f"{n} {said[state]}" for state, n in sorted(counts.items())]
    return (f"{sum(counts.values())} trial(s) left running by an earlier process: "
            + ", ".join(parts))


def _stored_recipe(data: Any) -> Recipe | None:
    """The Recipe a trial stored (keys added since then take their defaults), or None."""
    try:
        return Recipe.from_dict(data)
    except (TypeError, ValueError):
        return None


def reuse_earlier(trial: optuna.Trial, spec: StudySpec) -> tuple[float, ...] | None:
    """If a completed trial had this trial's recipe, copy its figures here and return its
    values (the pipeline is deterministic); else None. The recipe attribute must be set."""
    other = _same_recipe(trial, TrialState.COMPLETE)
    if other is None:
        return None
    trial.set_user_attr(METRICS_ATTR, other.user_attrs[METRICS_ATTR])
    trial.set_user_attr(DUPLICATE_ATTR, other.number)
    for name, value in other.constraints.items():
        trial.set_constraint(name, value)
    trial.set_user_attr(VALUES_ATTR, list(other.values))
    return tuple(other.values)


def stopped_earlier(trial: optuna.Trial) -> str | None:
    """If a trial with this trial's recipe was stopped early, mark this one a duplicate of
    it and return its reason (the pipeline is deterministic, so it would stop again)."""
    other = _same_recipe(trial, TrialState.PRUNED, having=STOPPED_ATTR)
    if other is None:
        return None
    trial.set_user_attr(DUPLICATE_ATTR, other.number)
    trial.set_user_attr(STOPPED_ATTR, other.user_attrs[STOPPED_ATTR])
    return other.user_attrs[STOPPED_ATTR]


def _same_recipe(trial: optuna.Trial, state: TrialState, having: str = RECIPE_ATTR
                 ) -> FrozenTrial | None:
    """The first trial in ``state`` with the user attribute ``having`` that ran this trial's
    recipe itself (not as a duplicate)."""
    recipe = Recipe.from_dict(trial.user_attrs[RECIPE_ATTR])
    for other in trial.study.get_trials(deepcopy=False, states=(state,)):
        if (having in other.user_attrs and DUPLICATE_ATTR not in other.user_attrs
                and _stored_recipe(other.user_attrs.get(RECIPE_ATTR)) == recipe):
            return other
    return None


def record_result(trial: optuna.Trial, spec: StudySpec, result: TrialResult
                  ) -> tuple[float, ...] | None:
    """Store a trial's metrics on the Optuna trial, with its failure reason, the reason it
    was stopped, or its quality constraint and then its values; return the objective values,
    or None when the trial failed or was stopped (the backend then records it FAIL or
    PRUNED). The values are written last, so a trial holding them has its whole result
    (``settle_running`` completes it if its process dies before telling Optuna)."""
    trial.set_user_attr(METRICS_ATTR, json_safe(result.metrics))
    if result.stopped is not None:
        trial.set_user_attr(STOPPED_ATTR, result.stopped)
        return None
    if not result.ok:
        trial.set_user_attr(FAILURE_ATTR, result.failure)
        return None
    drop = result.metrics["quality_drop"]
    trial.set_constraint("max_quality_drop", drop - spec.constraints.max_quality_drop)
    values = tuple(result.values[name] for name in spec.objectives)
    trial.set_user_attr(VALUES_ATTR, list(values))
    return values


def guide_data(study: optuna.Study, spec: StudySpec, ends_at: float | None = None
               ) -> dict[str, Any]:
    """What the study's finished trials can save the next trial, as plain data (it travels
    to Ray workers): latency figures per structure fingerprint, the figures of the feasible
    trials at the teacher's quality or better (they may dominate a candidate), the latency
    and size of every feasible trial, how many trials were promoted, and when the run's
    time budget ends (``ends_at``, ``time.time()``; None: no budget)."""
    finished = [t for t in study.get_trials(deepcopy=False,
                                            states=(TrialState.COMPLETE, TrialState.PRUNED))
                if DUPLICATE_ATTR not in t.user_attrs and METRICS_ATTR in t.user_attrs]
    timed: dict[str, dict[str, Any]] = {}
    best, feasible = [], []
    for t in (t for t in finished if t.state == TrialState.COMPLETE):
        metrics = t.user_attrs[METRICS_ATTR]
        if metrics.get("structure") and metrics["structure"] not in timed:
            figures = {k: metrics[k] for k in LATENCY_FIGURES if k in metrics}
            figures["latency_cached_from"] = metrics.get("latency_cached_from", t.number)
            timed[metrics["structure"]] = figures
        drop = metrics.get("quality_drop", math.inf)
        if drop <= spec.constraints.max_quality_drop:
            feasible.append([metrics["latency_ms"], metrics["size_mb"]])
        if drop <= min(0.0, spec.constraints.max_quality_drop):
            best.append([t.number, metrics["latency_ms"], metrics["size_mb"]])
    promoted = sum("promoted" in t.user_attrs[METRICS_ATTR] for t in finished)
    return {"timed": timed, "best": best, "feasible": feasible, "promoted": promoted,
            "ends_at": ends_at, "rung_points": _rung_points(finished, spec.finetune.steps)}


def _rung_points(trials: list, steps: int) -> list[list[float]]:
    """``[fraction, slice quality, latency_ms, size_mb]`` of each rung after the start of
    every finished trial whose structure was timed."""
    points = []
    for t in trials:
        metrics = t.user_attrs[METRICS_ATTR]
        if not (metrics.get("rungs") and "latency_ms" in metrics and "size_mb" in metrics):
            continue
        for entry in metrics["rungs"].split(","):
            step, quality = entry.split(":")
            if 0 < int(step) < steps:
                points.append([int(step) / steps, float(quality), metrics["latency_ms"],
                               metrics["size_mb"]])
    return points


def guide_for(spec: StudySpec, data: dict[str, Any] | None) -> Guide:
    """The trial guide of ``guide_data`` (None: the stopping rule alone)."""
    data = data or {"timed": {}, "best": []}
    best, feasible = data["best"], data.get("feasible", [])

    def extends_front(latency_ms: float, size: float) -> bool:
        return (not feasible or latency_ms < min(f[0] for f in feasible)
                or size < min(f[1] for f in feasible))

    def dominated(latency_ms: float, size: float) -> str | None:
        for number, latency, size_mb in best:
            if latency <= latency_ms and size_mb <= size:
                return f"trial {number}"
        return None

    return Guide(stopping=spec.stopping, max_quality_drop=spec.constraints.max_quality_drop,
                 known_latency=data["timed"].get, dominated=dominated if best else None,
                 promotions_left=spec.stopping.promotions - data.get("promoted", 0),
                 extends_front=extends_front, ends_at=data.get("ends_at") or math.inf,
                 rung_points=tuple(RungPoint(*p) for p in data.get("rung_points", ())))


def is_feasible(spec: StudySpec, result: TrialResult) -> bool:
    """Whether ``result`` meets the spec's quality constraint."""
    return result.metrics["quality_drop"] <= spec.constraints.max_quality_drop


def json_safe(value: Any) -> Any:
    """``value`` with string keys, lists for tuples and None for non-finite floats."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
