"""The Recipe: one point of the joint compression space, frozen and JSON-serializable."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import Any

from ._technique import technique, techniques

# Keys of recipes stored by earlier versions, and where they live now.
_MOVED = {("quantization", "cluster_bits"): ("weight_sharing", "bits")}


class Recipe:
    """Everything applied to the teacher: one config per registered technique, applied in
    the techniques' order (student -> pruning -> low rank -> sparsity -> quantization
    set-up -> distillation fine-tune -> weight sharing -> quantization -> sparse storage).

    Built from configs given by position (placed by their type) or by section name;
    missing sections take their defaults. Settings that cannot act under the rest of the
    recipe take their defaults (each technique's ``normalize``), so two recipes giving the
    same model compare equal. Sections are attributes: ``recipe.pruning.ratio``.
    """

    __slots__ = ("_sections",)

    def __init__(self, *configs: Any, **sections: Any) -> None:
        by_type = {t.config: t.section for t in techniques()}
        for config in configs:
            if type(config) not in by_type:
                raise TypeError(f"{type(config).__name__} is not a recipe section")
            if by_type[type(config)] in sections:
                raise TypeError(f"recipe section {by_type[type(config)]!r} given twice")
            sections[by_type[type(config)]] = config
        for name, config in sections.items():
            expected = technique(name).config
            if type(config) is not expected:
                raise TypeError(f"recipe section {name!r} must be a {expected.__name__}. "
                                f"Got {type(config).__name__} instead.")
        full = {t.section: sections.get(t.section) or t.config() for t in techniques()}
        for t in techniques():
            full[t.section] = t.normalize(full[t.section], full)
        object.__setattr__(self, "_sections", full)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._sections[name]
        except KeyError:
            raise AttributeError(f"Recipe has no section {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a Recipe is frozen")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and self._sections == other._sections

    def __hash__(self) -> int:
        return hash(tuple(self._sections.items()))

    def __repr__(self) -> str:
        return "Recipe(" + ", ".join(f"{k}={v!r}" for k, v in self._sections.items()) + ")"

    def __reduce__(self) -> tuple:
        return (Recipe.from_dict, (self.to_dict(),))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: asdict(config) for name, config in self._sections.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """Inverse of ``to_dict``; missing sections take defaults, unknown keys raise. Keys
        of recipes stored by earlier versions are read at their current place."""
        if not isinstance(data, dict):
            raise TypeError(f"A recipe must be a dict. Got {type(data).__name__} instead.")
        data = _current(data)
        sections = {t.section: t for t in techniques()}
        unknown = set(data) - set(sections)
        if unknown:
            raise ValueError(
                f"Unknown recipe section(s) {sorted(unknown)}; expected {sorted(sections)}.")
        kwargs = {}
        for name, value in data.items():
            config_type = sections[name].config
            if not isinstance(value, dict):
                raise TypeError(f"Recipe section {name!r} must be a dict. Got {value!r}.")
            known = {f.name for f in fields(config_type)}
            extra = set(value) - known
            if extra:
                raise ValueError(f"Unknown key(s) {sorted(extra)} in recipe section {name!r}; "
                                 f"expected {sorted(known)}.")
            kwargs[name] = config_type(**value)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        return cls.from_dict(json.loads(text))

    def short(self) -> str:
        """A one-line summary for tables and progress lines (each technique's label)."""
        labels = (t.label(self._sections[t.section]) for t in techniques())
        return " ".join(label for label in labels if label)


def _current(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the keys of earlier versions moved to their current sections."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for (old_section, old_key), (section, key) in _MOVED.items():
        old = data.get(old_section)
        if isinstance(old, dict) and old_key in old:
            value = old.pop(old_key)
            if value or key not in data.get(section, {}):
                data.setdefault(section, {})[key] = value
    return data


def moved_parameter(name: str) -> str:
    """The current dotted name of a parameter ``section.key`` of an earlier version."""
    section, _, key = name.partition(".")
    return ".".join(_MOVED.get((section, key), (section, key)))
