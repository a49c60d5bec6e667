"""Domains of searched parameters: float ranges, choices and fixed values."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_GRID_POINTS = 10**9


@dataclass(frozen=True)
class FloatRange:
    """Floats from ``low`` to ``high`` inclusive, on a grid of ``step`` when given."""

    low: float
    high: float
    step: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"low and high must be finite. Got low={self.low}, "
                             f"high={self.high}.")
        if not self.low <= self.high:
            raise ValueError(f"low must be <= high. Got low={self.low}, high={self.high}.")
        if self.step is not None and not (math.isfinite(self.step) and self.step > 0):
            raise ValueError(f"step must be finite and > 0. Got {self.step}.")
        if self.step is not None:
            n = (self.high - self.low) / self.step
            if not n <= MAX_GRID_POINTS:  # also catches an infinite count
                raise ValueError(
                    f"step must leave at most {MAX_GRID_POINTS:,} grid points between low and "
                    f"high. Got low={self.low}, high={self.high}, step={self.step}.")
            if not math.isclose(n, round(n), abs_tol=1e-9):
                raise ValueError(
                    f"(high - low) must be a multiple of step. Got low={self.low}, "
                    f"high={self.high}, step={self.step}."
                )

    def candidates(self) -> list[float]:
        """The extreme values (and grid points when stepped), for validation."""
        return [self.low, self.high]

    def snap(self, value: float) -> float:
        """``value`` on the grid, without float noise (``0.1 + 0.2`` is ``0.3``): one
        recipe whichever way a sampler reached it."""
        if self.step is None:
            return float(value)
        return round(self.low + round((value - self.low) / self.step) * self.step, 10)


@dataclass(frozen=True)
class Choice:
    """One of a fixed list of values."""

    values: tuple[Any, ...]

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("a choice needs at least one value.")

    def candidates(self) -> list[Any]:
        return list(self.values)


@dataclass(frozen=True)
class Fixed:
    """A value that is not searched."""

    value: Any

    def candidates(self) -> list[Any]:
        return [self.value]


Domain = FloatRange | Choice | Fixed
