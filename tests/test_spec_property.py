"""Random values of the wrong type, range and kind at every key of a study spec: each one is
accepted or refused with ParetoslimError in one line, never another exception."""

from dataclasses import MISSING, fields
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paretoslim.search import ParetoslimError, StudySpec, parse_spec
from paretoslim.search._spec_file import _SECTIONS, _TOP_LEVEL
from paretoslim.spaces import DEFAULT_DOMAINS

SECTION_KEYS = [(section, f.name) for section, spec_type in _SECTIONS.items()
                for f in fields(spec_type)
                if f.default is not MISSING or f.default_factory is not MISSING]
SPACE_KEYS = [tuple(name.split(".")) for name in DEFAULT_DOMAINS]
TOP_KEYS = sorted(_TOP_LEVEL - set(_SECTIONS))
TRIED = {"values": 0, "accepted": 0, "refused": 0}

special_floats = st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, 1e308,
                                  -1e308, 5e-324])
scalars = st.one_of(
    special_floats, st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, -1, 1, 2**63]),
    st.booleans(), st.text(max_size=12),
    st.sampled_from(["", "nan", "../../escape", "a/b", ".", "..", "x" * 150, "\x00",
                     "fp32", "auto", "int8_static", "t.py:f", "os:system"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)
space_values = st.one_of(values, st.fixed_dictionaries(
    {"low": values, "high": values}, optional={"step": values}))


entry = st.one_of(
    st.tuples(st.sampled_from(TOP_KEYS), values).map(lambda kv: {kv[0]: kv[1]}),
    st.tuples(st.sampled_from(SECTION_KEYS), values).map(
        lambda kv: {kv[0][0]: {kv[0][1]: kv[1]}}),
    st.tuples(st.sampled_from(SPACE_KEYS), space_values).map(
        lambda kv: {"space": {kv[0][0]: {kv[0][1]: kv[1]}}}),
    st.tuples(st.sampled_from(SPACE_KEYS), values).map(
        lambda kv: {"seeds": [{kv[0][0]: {kv[0][1]: kv[1]}}]}),
    st.sampled_from(sorted(_SECTIONS) + ["space", "seeds", "task_options"]).flatmap(
        lambda key: values.map(lambda v: {key: v})),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(entry, min_size=1, max_size=3))
def test_every_spec_key_accepts_or_refuses_in_one_line(entries):
    data = {"task": "t.py:f"}
    for entry in entries:
        for key, value in entry.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
    TRIED["values"] += 1
    try:
        with mock.patch("paretoslim.search._task._resolve_factory",
                        side_effect=AssertionError("parsing a spec imported its task")):
            spec = parse_spec(data)
    except ParetoslimError as exc:
        TRIED["refused"] += 1
        message = str(exc)
        assert message.startswith("<spec>: ") and "\n" not in message, message
        assert "Traceback" not in message
        return
    TRIED["accepted"] += 1
    assert isinstance(spec, StudySpec)
    _check_accepted(spec)


def _check_accepted(spec: StudySpec) -> None:
    """What a spec that parses promises: finite numbers (inf only as "no time budget"),
    a name that is one safe path component, no control characters in strings."""
    import math

    for section in _SECTIONS:
        for f in fields(getattr(spec, section)):
            value = getattr(getattr(spec, section), f.name)
            if isinstance(value, float):
                assert math.isfinite(value), (section, f.name, value)
    assert "/" not in spec.name and "\\" not in spec.name and not spec.name.startswith(".")
    assert 0 <= spec.seed < 2**32
    for text in (spec.name, spec.storage, spec.task, spec.ray.address, spec.ray.results):
        assert not any(ord(c) < 32 for c in text)


def test_property_run_tried_values():
    """Runs after the property test (file order): it tried values and saw both outcomes."""
    if TRIED["values"]:
        print(f"\nspec property test: {TRIED}")
        assert TRIED["refused"] > 0
