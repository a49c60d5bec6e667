"""Reading a study spec: a TOML file to a validated StudySpec, every error naming the file
and the key."""

from __future__ import annotations

import difflib
import math
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from ..spaces import SearchSpace
from ._errors import ParetoslimError
from ._spec import (
    OBJECTIVES,
    CandidatesSpec,
    ConstraintsSpec,
    FinetuneSpec,
    LatencySpec,
    RaySpec,
    SamplerSpec,
    StoppingSpec,
    StudySpec,
    WorkerSpec,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_SECTIONS = {
    "constraints": ConstraintsSpec,
    "sampler": SamplerSpec,
    "finetune": FinetuneSpec,
    "latency": LatencySpec,
    "ray": RaySpec,
    "workers": WorkerSpec,
    "stopping": StoppingSpec,
    "candidates": CandidatesSpec,
}
_TOP_LEVEL = {"task", "name", "trials", "time_budget_s", "seed", "storage", "backend",
              "objectives", "task_options", "space", "seeds", *_SECTIONS}


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study spec; raise ParetoslimError naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ParetoslimError(f"{path}: study spec not found")
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ParetoslimError(f"{path}: not valid TOML ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ParetoslimError(f"{path}: not UTF-8 text, as TOML must be (byte {exc.start}: "
                              f"{exc.object[exc.start:exc.start + 1]!r})") from None
    except OSError as exc:
        raise ParetoslimError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return parse_spec(data, path)


def parse_spec(data: dict[str, Any], path: Path | None = None) -> StudySpec:
    """Validate a spec given as a dict (as read from TOML)."""
    where = str(path) if path is not None else "<spec>"
    _reject_unknown(where, "", data, _TOP_LEVEL)
    if "task" not in data:
        raise ParetoslimError(
            f"{where}: missing key 'task' (e.g. task = \"my_task.py:make_task\")"
        )
    kwargs: dict[str, Any] = {"path": path}
    hints = get_type_hints(StudySpec)
    for key in ("task", "name", "trials", "time_budget_s", "seed", "storage", "backend"):
        if key in data:
            kwargs[key] = _typed(where, key, data[key], hints[key])
    kwargs.setdefault("name", path.stem if path is not None else "study")
    if "objectives" in data:
        value = data["objectives"]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ParetoslimError(
                f"{where}: key 'objectives' must be a list of names from "
                f"{list(OBJECTIVES)}. Got {value!r}."
            )
        kwargs["objectives"] = tuple(value)
    if "task_options" in data:
        if not isinstance(data["task_options"], dict):
            raise ParetoslimError(f"{where}: [task_options] must be a table")
        kwargs["task_options"] = dict(data["task_options"])
    for section, spec_type in _SECTIONS.items():
        if section in data:
            kwargs[section] = parse_section(where, section, data[section], spec_type)
    if "space" in data:
        kwargs["space"] = _space(where, data["space"])
    if "seeds" in data:
        seeds = data["seeds"]
        if not (seeds == "auto" or isinstance(seeds, list)
                and all(isinstance(s, dict) for s in seeds)):
            raise ParetoslimError(f"{where}: key 'seeds' must be \"auto\" or a list of recipe "
                                  f"tables ([[seeds]]). Got {seeds!r}.")
        kwargs["seeds"] = seeds if isinstance(seeds, str) else tuple(seeds)
    try:
        return StudySpec(**kwargs)
    except (ValueError, TypeError, KeyError) as exc:  # seeds are checked as recipes
        raise ParetoslimError(f"{where}: {_message(exc)}") from None


def _message(exc: Exception) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    return " ".join(str(text).split())


def parse_section(where: str, section: str, table: Any, spec_type: type) -> Any:
    """The table ``[section]`` as ``spec_type``; ParetoslimError naming ``where`` and the key."""
    if not isinstance(table, dict):
        raise ParetoslimError(f"{where}: [{section}] must be a table. Got {table!r}.")
    names = {f.name for f in fields(spec_type)
             if f.default is not MISSING or f.default_factory is not MISSING}
    _reject_unknown(where, section, table, names)
    hints = get_type_hints(spec_type)
    kwargs = {key: _typed(where, f"{section}.{key}", value, hints[key])
              for key, value in table.items()}
    try:
        return spec_type(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ParetoslimError(f"{where}: {section}.{_message(exc)}") from None


def _space(where: str, table: Any) -> SearchSpace:
    if not isinstance(table, dict):
        raise ParetoslimError(f"{where}: [space] must be a table")
    try:
        space = SearchSpace.from_table(table)
        _finite_domains(space)
        return space
    except KeyError as exc:
        key = exc.args[0]
        from ..spaces import DEFAULT_DOMAINS

        valid = sorted(f"space.{n}" for n in DEFAULT_DOMAINS)
        raise ParetoslimError(
            f"{where}: unknown key {key!r}{_did_you_mean(key, valid)}; valid keys: "
            f"{', '.join(valid)}"
        ) from None
    except (TypeError, ValueError) as exc:
        raise ParetoslimError(f"{where}: {_message(exc)}") from None


def _finite_domains(space: SearchSpace) -> None:
    """Raise ValueError for a NaN or infinite bound, step or choice of the space."""
    for name, domain in space.domains.items():
        numbers = [getattr(domain, key, None) for key in ("low", "high", "step")]
        numbers += list(getattr(domain, "values", ()))
        for value in numbers:
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"space.{name} must hold finite numbers. Got {value!r}.")


def _typed(where: str, key: str, value: Any, hint: Any) -> Any:
    expected = [t for t in (get_args(hint) or (hint,)) if t is not type(None)]
    if get_origin(hint) is not None and not get_args(hint):
        expected = [get_origin(hint)]
    if float in expected and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and bool not in expected:
        ok = False
    else:
        ok = any(isinstance(value, t) for t in expected if isinstance(t, type))
    if not ok:
        names = " or ".join(t.__name__ for t in expected if isinstance(t, type))
        raise ParetoslimError(
            f"{where}: key {key!r} must be {names}. Got {type(value).__name__} {value!r}."
        )
    if isinstance(value, str) and any(ord(c) < 32 for c in value):
        raise ParetoslimError(f"{where}: key {key!r} must not hold control characters. "
                              f"Got {value!r}.")
    return value


def _reject_unknown(where: str, section: str, table: dict, valid: set[str]) -> None:
    for key in table:
        if key not in valid:
            full = f"{section}.{key}" if section else key
            place = f"[{section}]" if section else "the top level"
            raise ParetoslimError(
                f"{where}: unknown key {full!r} in {place}{_did_you_mean(key, valid)}; "
                f"valid keys: {', '.join(sorted(valid))}"
            )


def _did_you_mean(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
