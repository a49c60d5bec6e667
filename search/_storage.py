"""Where studies are stored: journal files and database URLs, making an Optuna storage of
either, and the one-line errors of a storage that cannot be used (its password hidden)."""

from __future__ import annotations

import contextlib
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna

from ._errors import ParetoslimError
from ._journal import repair_torn_tail, warn_torn_tail
from ._journal import unreadable as journal_unreadable
from ._spec import StudySpec, WorkerSpec

JOURNAL_LOCK_GRACE_S = 30  # a journal lock kept this long (its writer was killed) is taken over
_URL_SCHEMES = ("sqlite:", "postgresql", "mysql", "oracle", "mssql")


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
