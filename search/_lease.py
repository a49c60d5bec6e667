"""One driver per study: the lease a ``run`` holds on its study while it drives it.

Only the lease holder finishes trials left running (``mark_interrupted``), so a second run
never fails the running trial of a live one. A study in a journal or SQLite file is leased
through a lock file next to it (``FILE.NAME.lease``, an exclusive ``flock`` holding the
holder's ``host:pid``); one in PostgreSQL through a session advisory lock (the holder is
named in the study's ``driver`` attribute). The operating system or the database server
drops the lease of a process that dies, however it dies, so the next run takes it over.
Other databases offer no lease: a run there leaves trials found running alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna

from ._errors import ParetoslimError
from ._storage import database_url, is_rdb_url, shown, sqlite_file
from ._store import StudyStore


def holder_line() -> str:
    """How this process names itself in a lease: ``host:pid since TIME``."""
    return f"{socket.gethostname()}:{os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"


@contextlib.contextmanager
def study_lease(study: optuna.Study, location: str) -> Iterator[bool]:
    """Hold the lease on ``study`` (stored at ``location``) for the block.

    Yields True when the lease is held, False when the storage offers none (an in-memory
    SQLite database, a database other than PostgreSQL). Raises ParetoslimError naming the
    holder when another live process holds it.
    """
    name = study.study_name
    if not is_rdb_url(location):
        path: Path | None = Path(location).expanduser().resolve()
    else:
        path = sqlite_file(location)
        if path is not None:
            path = path.expanduser().resolve()
    if path is not None:
        with _file_lease(Path(f"{path}.{name}.lease"), name, location):
            yield True
    elif location.startswith("postgres"):
        with _postgres_lease(study, location):
            yield True
    else:
        yield False


def _busy(name: str, location: str, holder: str) -> ParetoslimError:
    holder = holder.strip() or "another process"
    host, _, pid = holder.split(" ")[0].rpartition(":")
    stop = f" (kill {pid} on {host})" if host and pid.isdigit() else ""
    return ParetoslimError(
        f"study {name!r} in {shown(location)} is being run by {holder}; one run drives a "
        f"study at a time: wait for it to end or stop it{stop}, or share a database study "
        "among `paretoslim worker`s instead")


@contextlib.contextmanager
def _file_lease(path: Path, name: str, location: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing), its text the holder."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    # no O_TRUNC: a process that fails to take the lease must not erase the holder's name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(name, location, os.pread(fd, 4096, 0).decode(errors="replace")) \
                from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (holder_line() + "\n").encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # kept, not removed: another process may hold it open
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _lock_key(name: str) -> int:
    """A signed 64-bit advisory lock key for study ``name``."""
    digest = hashlib.sha256(f"paretoslim driver {name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.contextmanager
def _postgres_lease(study: optuna.Study, location: str) -> Iterator[None]:
    """A session advisory lock on a connection of its own, held for the block."""
    import sqlalchemy

    engine: Any = sqlalchemy.create_engine(database_url(location),
                                           poolclass=sqlalchemy.pool.NullPool)
    key = {"key": _lock_key(study.study_name)}
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            taken = connection.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:key)"),
                                       key).scalar()
            if not taken:
                raise _busy(study.study_name, location, StudyStore(study).driver())
            StudyStore(study).write_driver(holder_line())
            try:
                yield
            finally:
                with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError):  # lost: released
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), key)
    finally:
        engine.dispose()
