"""Dominance between points whose every coordinate is minimized: the one rule behind the
front, the stopping rules and the guide of a trial."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def dominates(a: Sequence[float], b: Sequence[float], *, weakly: bool = False) -> bool:
    """Whether ``a`` dominates ``b``: no worse in any coordinate and, unless ``weakly``,
    better in one."""
    no_worse = all(x <= y for x, y in zip(a, b, strict=True))
    return no_worse and (weakly or any(x < y for x, y in zip(a, b, strict=True)))


def dominated(point: Sequence[float], others: Iterable[Sequence[float]]) -> bool:
    """Whether some point of ``others`` dominates ``point``."""
    return any(dominates(other, point) for other in others)
