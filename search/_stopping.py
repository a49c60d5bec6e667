"""Constraint-aware stopping: the rule that ends a fine-tune whose quality curve cannot reach
the feasible region, measured at rungs on a fixed held-out slice."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Rung:
    """Quality on the held-out slice after ``step`` of ``steps`` fine-tune steps."""

    step: int
    steps: int
    quality: float


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
    return (f"stopped at fine-tune step {last.step}/{last.steps}: quality {last.quality:.4f} "
            f"on the held-out slice, projected at most {projected:.4f}, below the feasible "
            f"{limit:.4f} (slack {slack:g})")


def promotion_reason(curve: Sequence[Rung], limit: float, margin: float) -> str | None:
    """Why a trial at its last rung deserves a longer fine-tune, or None: its (optimistic)
    projection falls short of ``limit`` by less than ``margin``. One that reaches the limit
    is expected to end feasible with its planned steps; one farther below is not expected
    to close the gap."""
    if len(curve) < 2:
        return None
    projected = projected_quality(curve)
    if not limit - margin <= projected < limit:
        return None
    last = curve[-1]
    return (f"promoted at fine-tune step {last.step}/{last.steps}: projected {projected:.4f}, "
            f"short of the feasible {limit:.4f} by less than {margin:g}")
