"""SIGTERM handled as Ctrl-C: both interrupt the main thread with KeyboardInterrupt, so every
block on the way out cleans up (the running trial is recorded as failed with the signal's
name, the measuring process is ended, temporary files are removed)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

_received: list[int] = []  # the signals that interrupted this process, in order


class Interrupted(KeyboardInterrupt):
    """KeyboardInterrupt raised by a signal handler; ``signum`` says which signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    current = signal.getsignal(signal.SIGINT)
    if (signum == signal.SIGTERM and callable(current)
            and current not in (_on_signal, signal.default_int_handler)):
        current(signal.SIGINT, frame)  # someone else's Ctrl-C handling, e.g. Ray Tune's
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise ``Interrupted`` in the main thread (the
    handlers are restored after it). Elsewhere than in the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    with _handled_by(_on_signal):
        yield


@contextlib.contextmanager
def signals_end_process() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM end the process at once (status 130 / 143): for
    a server whose request handlers would swallow a KeyboardInterrupt, with nothing to
    clean up. Elsewhere than in the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def end(signum: int, frame: FrameType | None) -> None:
        sys.stdout.flush()
        sys.stderr.write(f"paretoslim: interrupted by {signal.Signals(signum).name}\n")
        sys.stderr.flush()
        os._exit(128 + signum)

    with _handled_by(end):
        yield


@contextlib.contextmanager
def _handled_by(handler) -> Iterator[None]:
    """SIGINT and SIGTERM go to ``handler`` within the block; the previous handlers after."""
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def last_signal() -> int | None:
    """The signal that last interrupted this process through these handlers, or None."""
    return _received[-1] if _received else None


def interrupted_by() -> str:
    """The name of the signal that interrupted this process (SIGINT when none was caught:
    Python's own Ctrl-C handling)."""
    return signal.Signals(_received[-1]).name if _received else "SIGINT"


def interrupt_status() -> int:
    """The exit status of an interrupted process: 128 + the signal (130 SIGINT, 143 SIGTERM)."""
    return 128 + (_received[-1] if _received else signal.SIGINT)
