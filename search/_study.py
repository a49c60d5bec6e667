"""Opening a study to run it, finding a stored one to read it, and the copy read verbs use."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from ._errors import ParetoslimError
from ._private import storage_of_study
from ._sampling import make_sampler
from ._spec import StudySpec, WorkerSpec, check_study_name
from ._spec_file import load_spec
from ._storage import (
    check_storage,
    database_url,
    is_rdb_url,
    make_storage,
    shown,
    storage_errors,
    storage_of,
)
from ._store import StudyStore

CANDIDATES_SUFFIX = ".candidates"  # the study of a study's predicted tier, beside it

_CREATION_LOCK_KEY = 0x70617265746F  # "pareto": the advisory lock serializing creation


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
    StudyStore(study).write_spec(spec)
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
        path = StudyStore(study).spec_record().get("path")
        if isinstance(path, str) and os.path.isfile(path):
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


def resolve_candidates(ref: str, storage: str | None, warn: Callable[[str], None]
                       ) -> optuna.Study | None:
    """The readable copy of the candidate study beside the study ``ref`` names (its
    predicted tier), or None when it has none."""
    study, _ = resolve_study(ref, storage)
    storage_object = storage_of_study(study)
    name = study.study_name + CANDIDATES_SUFFIX
    if name not in {s.study_name for s in optuna.get_all_study_summaries(storage_object)}:
        return None
    candidates = optuna.load_study(study_name=name, storage=storage_object)
    try:
        return StudyStore(candidates).readable_copy(warn)
    except ValueError:
        warn(f"study {name!r}: its trials cannot be read; the predicted tier is left out")
        return None


def resolve_readable(ref: str, storage: str | None, warn: Callable[[str], None]
                     ) -> tuple[optuna.Study, StudySpec | None]:
    """``resolve_study``, the study given as its readable copy (see
    ``StudyStore.readable_copy``): what read-only verbs use."""
    study, spec = resolve_study(ref, storage)
    try:
        return StudyStore(study).readable_copy(warn), spec
    except ValueError as exc:
        raise ParetoslimError(f"study {study.study_name!r}: its trials cannot be read ({exc}); "
                              "the storage is damaged or not written by paretoslim") from None
