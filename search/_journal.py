"""The journal file a study lives in by default: a torn last line (a write cut short, e.g. by
a full disk) repaired before anything is appended, and damaged records refused with where."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from ._errors import ParetoslimError

_OP_CODES = range(0, 16)  # optuna.storages.journal's JournalOperation values, with room


def torn_tail(path: Path) -> int | None:
    """The byte offset of a last line that has no line break (a write cut short), or None."""
    try:
        size = path.stat().st_size
    except OSError:
        return None
    if size == 0:
        return None
    with open(path, "rb") as handle:
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return None
        offset = size
        while offset > 0:  # back to the last line break
            step = min(65536, offset)
            handle.seek(offset - step)
            block = handle.read(step)
            at = block.rfind(b"\n")
            if at >= 0:
                return offset - step + at + 1
            offset -= step
        return 0


def repair_torn_tail(path: Path, lock: Any) -> None:
    """Cut a torn last line off the journal at ``path`` (holding the journal's ``lock``, so no
    write is in progress), saying so on stderr: appending after it would merge the next record
    into it and make the whole journal unreadable."""
    from optuna.storages.journal._file import get_lock_file

    if torn_tail(path) is None:
        return
    with get_lock_file(lock):
        offset = torn_tail(path)
        if offset is None:
            return
        size = path.stat().st_size
        with open(path, "r+b") as handle:
            handle.truncate(offset)
            handle.flush()
            os.fsync(handle.fileno())
    print(f"paretoslim: warning: {path}: removed an incomplete last record ({size - offset} "
          "bytes; a write was cut short, e.g. by a full disk); every complete record is kept",
          file=sys.stderr)


def warn_torn_tail(path: Path) -> None:
    """Say on stderr that a read-only verb ignores the journal's torn last line."""
    offset = torn_tail(path)
    if offset is not None:
        print(f"paretoslim: warning: {path}: its last record is incomplete (a write was cut "
              "short) and is ignored; the next `paretoslim run` removes it", file=sys.stderr)


def first_damage(path: Path) -> str:
    """Where and how the journal at ``path`` stops being a journal of Optuna records ("" when
    every complete line is one), to name in an error."""
    try:
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.endswith(b"\n"):
                    return ""  # a torn last line: ignored by the reader
                problem = _line_problem(line)
                if problem:
                    return f"line {number} {problem}"
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    return ""


def _line_problem(line: bytes) -> str:
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        return "is not JSON"
    if not isinstance(record, dict):
        return "is not a record (a JSON object)"
    op = record.get("op_code")
    if not isinstance(op, int) or isinstance(op, bool) or op not in _OP_CODES:
        return f"has no known operation code (op_code {op!r})"
    return ""


def _misfit(path: Path) -> str:
    """The first record that does not fit the ones before it when replayed ("" if none)."""
    try:  # Optuna's own replay, one record at a time, to say which one
        from optuna.storages.journal._storage import JournalStorageReplayResult
    except ImportError:
        return ""
    replay = JournalStorageReplayResult("")
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.endswith(b"\n"):
                return ""
            try:
                replay.apply_logs([json.loads(line)])
            except Exception as exc:  # whatever the replay raises is about this record
                return (f"line {number} does not fit the records before it "
                        f"({type(exc).__name__})")
    return ""


def unreadable(path: Path, exc: BaseException) -> ParetoslimError:
    """The one-line error for a journal whose records Optuna could not replay."""
    where = (first_damage(path) or _misfit(path)
             or f"a record does not fit ({type(exc).__name__})")
    return ParetoslimError(
        f"journal {path} cannot be read: {where}; it was not written by paretoslim or is "
        "damaged (completed trials before that point can be recovered by cutting the file "
        "there)")
