"""The joint search space: a domain per recipe parameter, defined once for every backend."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ._recipe import _SECTION_TYPES, QUANT_SCHEMES, Recipe


@dataclass(frozen=True)
class FloatRange:
    """Floats from ``low`` to ``high`` inclusive, on a grid of ``step`` when given."""

    low: float
    high: float
    step: float | None = None

    def __post_init__(self) -> None:
        if not self.low <= self.high:
            raise ValueError(f"low must be <= high. Got low={self.low}, high={self.high}.")
        if self.step is not None and not self.step > 0:
            raise ValueError(f"step must be > 0. Got {self.step}.")
        if self.step is not None:
            n = (self.high - self.low) / self.step
            if not math.isclose(n, round(n), abs_tol=1e-9):
                raise ValueError(
                    f"(high - low) must be a multiple of step. Got low={self.low}, "
                    f"high={self.high}, step={self.step}."
                )

    def candidates(self) -> list[float]:
        """The extreme values (and grid points when stepped), for validation."""
        return [self.low, self.high]


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

_SEARCHED_BY_DEFAULT: dict[str, Domain] = {
    "student.width": FloatRange(0.5, 1.0, 0.125),
    "pruning.ratio": FloatRange(0.0, 0.7, 0.05),
    "quantization.scheme": Choice(QUANT_SCHEMES),
}

# Every recipe parameter has a domain; those not searched by default are fixed at the
# configuration's default (the technique off, or its most common setting).
DEFAULT_DOMAINS: dict[str, Domain] = {
    f"{section}.{f.name}": _SEARCHED_BY_DEFAULT.get(f"{section}.{f.name}", Fixed(f.default))
    for section, config_type in _SECTION_TYPES.items()
    for f in fields(config_type)
}


@dataclass(frozen=True)
class SearchSpace:
    """Maps each dotted recipe parameter (``section.field``) to its domain."""

    domains: Mapping[str, Domain]

    def __post_init__(self) -> None:
        unknown = set(self.domains) - set(DEFAULT_DOMAINS)
        if unknown:
            raise ValueError(
                f"Unknown space parameter(s) {sorted(unknown)}; valid: {sorted(DEFAULT_DOMAINS)}."
            )
        for name, domain in self.domains.items():
            for value in domain.candidates():
                _check_value(name, value)

    @classmethod
    def default(cls) -> SearchSpace:
        return cls(dict(DEFAULT_DOMAINS))

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> SearchSpace:
        """Build from a spec's ``[space]`` table; unspecified parameters keep their default.

        Each value is a number or string (fixed), a list (a choice), or a table
        ``{low, high, step}`` (a float range). Raises KeyError naming an unknown key,
        ValueError or TypeError naming a bad value.
        """
        domains = dict(DEFAULT_DOMAINS)
        for section, entries in table.items():
            if section not in _SECTION_TYPES:
                raise KeyError(f"space.{section}")
            if not isinstance(entries, Mapping):
                raise TypeError(f"space.{section} must be a table. Got {entries!r}.")
            for key, raw in entries.items():
                name = f"{section}.{key}"
                if name not in DEFAULT_DOMAINS:
                    raise KeyError(f"space.{name}")
                domains[name] = _parse_domain(name, raw)
        return cls(domains)

    def searched(self) -> dict[str, Domain]:
        """The domains that are actually searched (not Fixed)."""
        return {n: d for n, d in self.domains.items() if not isinstance(d, Fixed)}

    def recipe(self, params: Mapping[str, Any]) -> Recipe:
        """The Recipe for sampled ``params`` (dotted names) plus the fixed values."""
        sections: dict[str, dict[str, Any]] = {}
        for name, domain in self.domains.items():
            value = domain.value if isinstance(domain, Fixed) else params[name]
            section, key = name.split(".")
            sections.setdefault(section, {})[key] = value
        return Recipe.from_dict(sections)


def _parse_domain(name: str, raw: Any) -> Domain:
    if isinstance(raw, Mapping):
        extra = set(raw) - {"low", "high", "step"}
        if extra or not {"low", "high"} <= set(raw):
            raise ValueError(
                f"space.{name}: a range is a table {{low = ..., high = ..., step = ...}} "
                f"(step optional). Got {dict(raw)!r}."
            )
        try:
            return FloatRange(float(raw["low"]), float(raw["high"]),
                              None if raw.get("step") is None else float(raw["step"]))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"space.{name}: {exc}") from exc
    if isinstance(raw, (list, tuple)):
        return Choice(tuple(raw))
    return Fixed(raw)


def _check_value(name: str, value: Any) -> None:
    section, key = name.split(".")
    config_type = _SECTION_TYPES[section]
    valid = {f.name for f in fields(config_type)}
    if key not in valid:
        raise KeyError(f"space.{name}")
    try:
        config_type(**{key: value})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"space.{name}: {exc}") from exc
