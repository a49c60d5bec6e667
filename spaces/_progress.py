"""Progress of one long phase (a teacher's training, a long fine-tune): a bar on a terminal;
into a log or a pipe, a line at least every ``every_s`` seconds with an estimate of the time
left, so that no phase runs silent."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm.auto import tqdm

LOG_EVERY_S = 30.0


class PhaseProgress:
    """``update`` after each step of ``total``; ``close`` (or leave the ``with`` block) at
    the end. ``terminal`` None: a bar when ``stream`` (default stderr) is a terminal."""

    def __init__(self, desc: str, total: int, *, enabled: bool = True,
                 terminal: bool | None = None, every_s: float = LOG_EVERY_S,
                 stream: TextIO | None = None, unit: str = "step"):
        self.desc, self.total, self.unit = desc, max(int(total), 0), unit
        self.stream = stream or sys.stderr
        self.enabled, self.every_s = enabled, every_s
        self.terminal = is_terminal(self.stream) if terminal is None else terminal
        self.done = 0
        self.started = self.last_line = time.monotonic()
        self.bar = tqdm(total=self.total, desc=desc, unit=unit, dynamic_ncols=True,
                        file=self.stream, disable=not (enabled and self.terminal))

    def __enter__(self) -> PhaseProgress:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.done += n
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(n)
        now = time.monotonic()
        if self.enabled and not self.terminal and now - self.last_line >= self.every_s:
            self.last_line = now
            shown = "".join(f", {k} {v}" for k, v in postfix.items())
            self.stream.write(f"{self.desc}: {self.line(now)}{shown}\n")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        """``done/total (percent), about T left``: what a log line says."""
        elapsed = (time.monotonic() if now is None else now) - self.started
        share = self.done / self.total if self.total else 1.0
        text = f"{self.unit} {self.done}/{self.total} ({share:.0%})"
        return text + time_left(elapsed, self.done, self.total)

    def close(self) -> None:
        self.bar.close()


def time_left(elapsed: float, done: int, total: int) -> str:
    """``, about T left`` at the pace of ``done`` steps in ``elapsed`` seconds ("" before
    the first step and after the last)."""
    if not 0 < done < total:
        return ""
    return f", about {_duration(elapsed * (total - done) / done)} left"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False
