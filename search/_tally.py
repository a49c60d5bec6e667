"""When a run ends: at its target of distinct completed trials, at its time budget (counted from
its first trial, once the task and the teacher's baseline are ready), or after a bounded number
of trials in a row that completed nothing new (failed, stopped, or a repeated recipe)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

OutcomeKind = Literal["new", "failed", "stopped", "repeat"]  # what a finished trial brought


def fruitless_limit(target: int) -> int:
    """How many trials in a row that complete nothing new end a run aiming at ``target``."""
    return max(5, target)


@dataclass
class RunTally:
    """What one run has done, and the reason to start no further trial (``why_stop``)."""

    target: int
    budget_s: float | None
    name: str = "STUDY"
    limit: int = 0  # 0: fruitless_limit(target)
    ends_at: float | None = field(default=None, init=False)
    fruitless: Counter = field(default_factory=Counter, init=False)
    exhausted: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.limit = self.limit or fruitless_limit(self.target)

    def start_clock(self) -> None:
        """The first trial is about to start: the time budget counts from now."""
        if self.ends_at is None and self.budget_s is not None:
            self.ends_at = time.time() + self.budget_s

    def record(self, outcome: OutcomeKind) -> None:
        if outcome == "new":
            self.fruitless.clear()
        else:
            self.fruitless[outcome] += 1

    def why_stop(self, done: int) -> str | None:
        """None while another trial should start; else why not ("" for the target reached,
        which needs no note). ``done`` is the study's distinct completed trials."""
        if done >= self.target:
            return ""
        if self.exhausted:
            return (f"every recipe of the space has been tried ({done} distinct completed "
                    "trials); widen the space or lower --trials")
        run = sum(self.fruitless.values())
        if run >= self.limit:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.fruitless.items()))
            return (f"stopped after {run} trials in a row that completed nothing new "
                    f"({kinds.replace('repeat', 'repeated recipes')}); see `paretoslim front "
                    f"{self.name} --all` for their reasons")
        if self.ends_at is not None and time.time() >= self.ends_at:
            return (f"time budget of {self.budget_s:g} s (time_budget_s, counted from the "
                    f"first trial) reached with {done} completed trials")
        return None
