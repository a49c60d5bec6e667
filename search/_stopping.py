"""Constraint-aware stopping: the rule that ends a fine-tune whose quality curve cannot reach
the feasible region, measured at rungs on a fixed held-out slice."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ._dominance import dominates


@dataclass(frozen=True)
class Rung:
    """Quality on the held-out slice after ``step`` of ``steps`` fine-tune steps."""

    step: int
    steps: int
    quality: float


RUNG_STOP = "stopped at fine-tune step"  # how the reason of a stop at a rung begins


def projected_quality(curve: Sequence[Rung]) -> float:
    """An optimistic final quality: the last rung's quality plus its last slope carried over
    every remaining step. Recovery curves flatten as the learning rate decays (cosine), so
    the slope only falls; a first rung (no slope yet) projects no bound (infinity)."""
    if len(curve) < 2:
        return float("inf")
    last, before = curve[-1], curve[-2]
    slope = max(0.0, (last.quality - before.quality) / max(1, last.step - before.step))
    return last.quality + slope * (last.steps - last.step)


def stop_reason(curve: Sequence[Rung], limit: float, slack: float) -> str | None:
    """Why the trial should stop now, or None: its projected quality stays below ``limit``
    (the teacher's slice quality minus the allowed drop) by more than ``slack``."""
    if not curve or curve[-1].step == 0 or curve[-1].step >= curve[-1].steps:
        return None
    projected = projected_quality(curve)
    if projected + slack >= limit:
        return None
    last = curve[-1]
    return (f"{RUNG_STOP} {last.step}/{last.steps}: quality {last.quality:.4f} "
            f"on the held-out slice, projected at most {projected:.4f}, below the feasible "
            f"{limit:.4f} (slack {slack:g})")


def promotion_reason(curve: Sequence[Rung], limit: float, margin: float,
                     wanted: bool = False) -> str | None:
    """Why a trial at its last rung deserves a longer fine-tune, or None: its (optimistic)
    projection falls short of ``limit`` by less than ``margin``. One that reaches the limit
    is expected to end feasible with its planned steps, unless the promotion is
    ``wanted`` (a candidate picked for one: its prediction already says the planned steps
    fall short); one farther below is not expected to close the gap."""
    if len(curve) < 2:
        return None
    projected = projected_quality(curve)
    if projected < limit - margin or (projected >= limit and not wanted):
        return None
    last = curve[-1]
    return (f"promoted at fine-tune step {last.step}/{last.steps}: projected {projected:.4f}, "
            f"short of the feasible {limit:.4f} by less than {margin:g}")


@dataclass(frozen=True)
class RungPoint:
    """A trial at a rung: its slice quality there (``fraction`` of the planned fine-tune)
    and the latency and size of its structure."""

    fraction: float
    quality: float
    latency_ms: float
    size_mb: float

    def dominates(self, other: RungPoint) -> bool:
        return dominates(self.losses, other.losses)

    @property
    def losses(self) -> tuple[float, float, float]:
        """The point with every coordinate minimized."""
        return (-self.quality, self.latency_ms, self.size_mb)


def halving_reason(point: RungPoint, earlier: Sequence[RungPoint], eta: int) -> str | None:
    """Successive halving on non-dominated rank: why the trial at ``point`` should stop,
    or None. The trials that reached the same rung (``point`` and the ``earlier`` ones at
    its fraction) are sorted into non-dominated fronts by slice quality (higher is better),
    latency and size (lower); the trial goes on while fewer than ``ceil(n / eta)`` of the
    ``n`` lie in fronts ahead of its own. Fewer than ``eta`` trials at the rung stop none."""
    peers = [p for p in earlier if math.isclose(p.fraction, point.fraction)]
    n = len(peers) + 1
    if eta < 2 or n < eta:
        return None
    keep = math.ceil(n / eta)
    remaining, ahead = [point, *peers], 0
    while True:
        front = [p for p in remaining if not any(q.dominates(p) for q in remaining)]
        if any(p is point for p in front):
            break
        ahead += len(front)
        remaining = [p for p in remaining if all(p is not f for f in front)]
    if ahead < keep:
        return None
    return (f"stopped by successive halving at {point.fraction:g} of the fine-tune: {ahead} "
            f"of the {n} trials at this rung rank ahead of it by slice quality, latency and "
            f"size (the best {keep} go on)")
