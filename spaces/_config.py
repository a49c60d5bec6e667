"""Declared recipe parameters: each field's valid values, checked once and documented once."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import MISSING, Field, field, fields
from typing import Any


def param(default: Any, *, low: float | None = None, high: float | None = None,
          low_open: bool = False, choices: tuple | Callable[[], tuple] | None = None,
          integer: bool = False, off: bool = False, note: str = "") -> Any:
    """A config field with its valid values: a range ``[low, high]`` (``(low, high]`` when
    ``low_open``; integral when ``integer``), a tuple of ``choices``, or a bool when the
    default is one. ``off``: the default turns the technique off. ``note`` ends the
    parameter's row in the README's table."""
    return field(default=default, metadata={
        "low": low, "high": high, "low_open": low_open, "choices": choices,
        "integer": integer, "off": off, "note": note})


class Config:
    """Base of the frozen recipe sections: fields declared with ``param`` are validated on
    construction, with messages naming the parameter, the section and the value."""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            check_param(self, f)


def check_param(config: Any, f: Field) -> None:
    owner, name, value, meta = type(config).__name__, f.name, getattr(config, f.name), f.metadata
    prefix = f"The {name!r} parameter of {owner}"
    if meta.get("choices"):
        choices = choices_of(f)
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            raise ValueError(f"{prefix} must be one of {list(choices)}. Got {value!r} instead.")
    elif isinstance(f.default, bool):
        if not isinstance(value, bool):
            raise TypeError(f"{prefix} must be true or false. Got {value!r} instead.")
    elif meta.get("integer"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                not math.isfinite(value) or value != int(value)):
            raise TypeError(f"{prefix} must be an integer. Got {value!r} instead.")
        check_range(prefix, value, meta["low"], meta["high"])
        object.__setattr__(config, name, int(value))  # a sampled 4.0 is the integer 4
    elif meta.get("high") is not None:
        check_range(prefix, value, meta["low"], meta["high"], low_open=meta["low_open"])


def check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                infinite: bool = False) -> None:
    """Raise unless ``value`` is a number within the bounds (``low`` excluded when
    ``low_open``): TypeError for another type, ValueError for NaN, for infinity unless
    ``infinite`` allows it, and outside the bounds; each message names ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number. Got {type(value).__name__} instead.")
    if isinstance(value, float) and not math.isfinite(value):
        if math.isnan(value) or not infinite:
            raise ValueError(f"{name} must be a finite number. Got {value!r}.")
    below = value <= low if low_open else value < low
    if below or value > high:
        raise ValueError(f"{name} must be in {'(' if low_open else '['}{low}, {high}]. "
                         f"Got {value!r}.")


def valid_values(f: Field) -> str:
    """The README's wording of a field's valid values."""
    meta = f.metadata
    if meta.get("choices"):
        text = ", ".join(f"`{c}`" for c in choices_of(f))
    elif isinstance(f.default, bool):
        text = "`true`, `false`"
    elif meta.get("integer"):
        text = f"{meta['low']} to {meta['high']}"
    elif meta.get("high") is not None:
        text = f"{'(' if meta['low_open'] else '['}{meta['low']:g}, {meta['high']:g}]"
    else:
        text = "any"
    return f"{text}: {meta['note']}" if meta.get("note") else text


def choices_of(f: Field) -> tuple:
    """A field's choices; a callable gives those of a registry, read when checked."""
    choices = f.metadata["choices"]
    return tuple(choices() if callable(choices) else choices)


def default_of(f: Field) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
