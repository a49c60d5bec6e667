"""Random bytes and random valid-looking records in a journal, random types in stored trial
records and random bytes in a spec, through every read verb: no traceback, nothing run, exit 2
or a readable result. ``PARETOSLIM_PROPERTY_EXAMPLES`` sets how many inputs each test tries."""

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reliability import READ_VERBS, stored_study

from paretoslim.search.cli import main

EXAMPLES = int(os.environ.get("PARETOSLIM_PROPERTY_EXAMPLES", "25"))
FOUND: dict[str, dict[int, int]] = {}  # per test: how many inputs ended with each status
_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture,
                                            HealthCheck.too_slow])

MARKER = Path(tempfile.gettempdir()) / "paretoslim-property-ran"
PAYLOADS = [f"__import__('os').system('touch {MARKER}')", "os:system", "task.py:make_task",
            "Symbol('s0') + __import__('os')"]
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
              st.sampled_from(PAYLOADS)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)
# what Optuna's journal records are made of: an op code, a worker, ids, names and values
record_fields = st.fixed_dictionaries(
    {"op_code": st.integers(min_value=-1, max_value=16)},
    optional={"worker_id": st.text(max_size=6), "study_id": st.integers(-1, 3),
              "trial_id": st.integers(-1, 5), "key": st.sampled_from(["metrics", "recipe",
                                                                      "values", "x"]),
              "value": json_values, "state": st.integers(-1, 6),
              "values": st.lists(st.floats(allow_nan=True), max_size=4),
              "study_name": st.text(max_size=6), "directions": st.lists(st.integers(-1, 3)),
              "param_name": st.text(max_size=6), "param_value_internal": json_values,
              "distribution": st.text(max_size=20), "user_attrs": json_values,
              "datetime_start": st.text(max_size=20)})


@pytest.fixture(scope="module", autouse=True)
def summary():
    """Print, at the end of the module, how many inputs each test ran through the verbs."""
    yield
    for test, counts in sorted(FOUND.items()):
        print(f"\n{test}: {sum(counts.values())} verb runs, exit status counts {counts}")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A stored study (spec, task file, journal) to copy for each input."""
    root = tmp_path_factory.mktemp("property")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        stored_study(root)
    finally:
        os.chdir(cwd)
    (root / "study.toml").unlink()  # export then stops before rebuilding a model
    return root


def _copy(base: Path) -> Path:
    root = Path(tempfile.mkdtemp(prefix="input-"))
    shutil.copytree(base, root, dirs_exist_ok=True)
    return root


def _through_every_read_verb(root: Path, test: str, marker: Path = MARKER) -> None:
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for verb in READ_VERBS:
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                status = main([verb[0], "tiny", *verb[1:]])
            text = err.getvalue()
            assert "Traceback" not in text, (verb, text)
            assert status in (0, 2), (verb, status, text)
            if status == 2:
                assert len([x for x in text.splitlines() if "error:" in x]) == 1, text
            counts = FOUND.setdefault(test, {})
            counts[status] = counts.get(status, 0) + 1
        assert not marker.exists()
    finally:
        os.chdir(cwd)
        shutil.rmtree(root, ignore_errors=True)


@_SETTINGS
@given(at=st.integers(min_value=0, max_value=40), junk=st.binary(max_size=64))
def test_random_bytes_in_a_journal(base, at, junk):
    root = _copy(base)
    journal = root / "runs" / "tiny" / "journal.log"
    lines = journal.read_bytes().splitlines(keepends=True)
    at = min(at, len(lines))
    journal.write_bytes(b"".join(lines[:at]) + junk + b"".join(lines[at:]))
    _through_every_read_verb(root, "bytes in a journal")


@_SETTINGS
@given(at=st.integers(min_value=0, max_value=40),
       records=st.lists(record_fields, min_size=1, max_size=3))
def test_random_valid_looking_records_in_a_journal(base, at, records):
    root = _copy(base)
    journal = root / "runs" / "tiny" / "journal.log"
    lines = journal.read_bytes().splitlines(keepends=True)
    at = min(at, len(lines))
    added = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    journal.write_bytes(b"".join(lines[:at]) + added + b"".join(lines[at:]))
    _through_every_read_verb(root, "records in a journal")


@_SETTINGS
@given(damage=st.dictionaries(
    st.sampled_from(["recipe", "metrics", "values", "fail_reason", "stopped", "duplicate_of",
                     "worker"]),
    st.one_of(json_values, st.dictionaries(
        st.sampled_from(["quality", "quality_drop", "latency_ms", "speedup", "size_mb",
                         "compression", "rungs", "structure", "target", "latency_noisy"]),
        json_values, max_size=4)), min_size=1, max_size=3))
def test_random_types_in_stored_trial_records(tmp_path_factory, damage):
    root = tmp_path_factory.mktemp("records")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        stored_study(root, damage=json.loads(json.dumps(damage, default=str)))
    finally:
        os.chdir(cwd)
    (root / "study.toml").unlink()
    _through_every_read_verb(root, "types in trial records")


@_SETTINGS
@given(text=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_random_bytes_in_a_spec(tmp_path_factory, text):
    root = tmp_path_factory.mktemp("spec")
    (root / "spec.toml").write_bytes(text)
    for verb in (["run", "spec.toml", "--quiet"], ["front", "spec.toml"]):
        err = io.StringIO()
        cwd = os.getcwd()
        os.chdir(root)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                status = main(verb)
        finally:
            os.chdir(cwd)
        assert status == 2 and "Traceback" not in err.getvalue(), err.getvalue()
        counts = FOUND.setdefault("bytes in a spec", {})
        counts[status] = counts.get(status, 0) + 1
