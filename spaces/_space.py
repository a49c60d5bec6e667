"""The joint search space: a domain per recipe parameter, defined once for every backend."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ._config import default_of
from ._domains import Choice, Domain, Fixed, FloatRange
from ._recipe import Recipe, moved_parameter
from ._technique import technique, techniques


def default_domains() -> dict[str, Domain]:
    """Every recipe parameter's default domain: searched where its technique says so, else
    fixed at the config's default (the technique off, or its most common setting)."""
    domains: dict[str, Domain] = {}
    for t in techniques():
        for f in fields(t.config):
            searched = t.searched.get(f.name)
            domain = searched() if callable(searched) else searched
            domains[f"{t.section}.{f.name}"] = domain or Fixed(default_of(f))
    return domains


@dataclass(frozen=True)
class SearchSpace:
    """Maps each dotted recipe parameter (``section.field``) to its domain."""

    domains: Mapping[str, Domain]

    def __post_init__(self) -> None:
        valid = default_domains()
        unknown = set(self.domains) - set(valid)
        if unknown:
            raise ValueError(
                f"Unknown space parameter(s) {sorted(unknown)}; valid: {sorted(valid)}.")
        for name, domain in self.domains.items():
            for value in domain.candidates():
                _check_value(name, value)

    @classmethod
    def default(cls) -> SearchSpace:
        return cls(default_domains())

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> SearchSpace:
        """Build from a spec's ``[space]`` table; unspecified parameters keep their default.

        Each value is a number or string (fixed), a list (a choice), or a table
        ``{low, high, step}`` (a float range). Raises KeyError naming an unknown key,
        ValueError or TypeError naming a bad value.
        """
        domains = default_domains()
        sections = {t.section for t in techniques()}
        for section, entries in table.items():
            if section not in sections:
                raise KeyError(f"space.{section}")
            if not isinstance(entries, Mapping):
                raise TypeError(f"space.{section} must be a table. Got {entries!r}.")
            for key, raw in entries.items():
                name = moved_parameter(f"{section}.{key}")
                if name not in domains:
                    raise KeyError(f"space.{section}.{key}")
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
            if isinstance(domain, FloatRange):
                value = domain.snap(value)
            section, key = name.split(".")
            sections.setdefault(section, {})[key] = value
        return Recipe.from_dict(sections)

    def params(self, recipe: Recipe) -> dict[str, Any]:
        """The searched parameters (dotted names) of ``recipe``: what ``recipe`` inverts."""
        return {name: getattr(getattr(recipe, name.split(".")[0]), name.split(".")[1])
                for name in self.searched()}


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
    config_type = technique(section).config
    valid = {f.name for f in fields(config_type)}
    if key not in valid:
        raise KeyError(f"space.{name}")
    try:
        config_type(**{key: value})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"space.{name}: {exc}") from exc
