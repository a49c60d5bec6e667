"""Every bad input is one line on stderr and exit status 2, never a traceback."""

import socket
import subprocess
import sys
import time

import pytest
from _tiny import write_study

from paretoslim.search import ParetoslimError, load_spec, parse_spec
from paretoslim.search.cli import main


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _fails(argv, capsys) -> str:
    """Run the CLI in this process; it must exit 2 with one line; return that line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("paretoslim: error: ")
    return err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("section, key", [("finetune", "learning_rate"),
                                          ("constraints", "max_quality_drop"),
                                          ("latency", "max_spread"),
                                          ("ray", "gpu"), ("ray", "cpu"),
                                          ("stopping", "slack")])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_spec_numbers_must_be_finite(in_tmp, capsys, section, key, value):
    spec_path = write_study(in_tmp)
    text, header = spec_path.read_text(), f"[{section}]\n"
    entry = f"{key} = {value}\n"
    spec_path.write_text(text.replace(header, header + entry) if header in text
                         else text + header + entry)
    line = _fails(["run", str(spec_path)], capsys)
    assert f"{section}.{key} must be a finite number" in line


def test_infinity_is_no_time_budget():
    spec = parse_spec({"task": "t.py:f", "finetune": {"trial_timeout_s": float("inf")}})
    assert spec.finetune.trial_timeout_s is None
    with pytest.raises(ParetoslimError, match="trial_timeout_s must be a finite number"):
        parse_spec({"task": "t.py:f", "finetune": {"trial_timeout_s": float("nan")}})


@pytest.mark.parametrize("name", ["../../escape", "a/b", ".hidden", "", "x" * 101, "a\\b",
                                  "-rf", "dots.."])
def test_a_study_name_must_be_a_safe_file_name(in_tmp, capsys, name):
    spec_path = write_study(in_tmp)
    spec_path.write_text(f"name = {name!r}\n".replace("'", '"')
                         + spec_path.read_text().replace('name = "tiny"\n', ""))
    line = _fails(["run", str(spec_path)], capsys)
    assert "name must be a file name" in line
    assert not (in_tmp / "runs").exists() and not (in_tmp.parent / "escape").exists()
    assert "no study" in _fails(["front", "--", name or "''"], capsys)


def test_a_study_name_may_have_inner_spaces_and_dots():
    assert parse_spec({"task": "t.py:f", "name": "mnist v2.1 run-3"}).name == "mnist v2.1 run-3"


def test_postgresql_urls_use_the_driver_of_the_postgres_extra(in_tmp, capsys):
    from paretoslim.search._storage import database_url, shown

    pytest.importorskip("psycopg2")
    url = f"postgresql://user:s3cret@127.0.0.1:{_closed_port()}/paretoslim"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        assert database_url(url).startswith("postgresql+psycopg2://user:s3cret@")
    line = _fails(["front", "tiny", "--storage", url], capsys)
    assert "cannot use the storage postgresql://user:***@127.0.0.1" in line
    assert "s3cret" not in line
    assert shown(url) == url.replace("s3cret", "***")


def test_an_unreachable_database_is_one_line_with_its_password_hidden(in_tmp, capsys):
    spec_path = write_study(in_tmp)
    url = f"postgresql://me:hunter2@127.0.0.1:{_closed_port()}/db"
    for argv in (["run", str(spec_path), "--storage", url],
                 ["pick", "tiny", "--storage", url],
                 ["worker", str(spec_path), "--storage", url]):
        line = _fails(argv, capsys)
        assert "me:***@" in line and "hunter2" not in line, line


def test_an_sqlite_file_in_a_missing_directory_is_refused_at_once(in_tmp, capsys):
    spec_path = write_study(in_tmp)
    begun = time.monotonic()
    line = _fails(["run", str(spec_path), "--storage", "sqlite:////nonexistent/dir/x.db"],
                  capsys)
    assert "the directory /nonexistent/dir does not exist" in line
    assert time.monotonic() - begun < 5


def test_read_only_verbs_do_not_create_a_database(in_tmp, capsys):
    for verb in (["front", "tiny"], ["pick", "tiny"], ["report", "tiny", "--out", "r.html"],
                 ["export", "tiny", "--trial", "0", "--out", "x"]):
        line = _fails([*verb, "--storage", "sqlite:///missing.db"], capsys)
        assert "the database missing.db does not exist" in line
        assert not (in_tmp / "missing.db").exists()


def test_export_of_an_empty_study_says_it_has_no_trials(in_tmp, capsys):
    spec_path = write_study(in_tmp)
    from paretoslim.search._study import open_study

    open_study(load_spec(spec_path))
    line = _fails(["export", str(spec_path), "--trial", "7", "--out", "x"], capsys)
    assert "has no trial 7 (it has no trials yet)" in line


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_dashboard_port_out_of_range(in_tmp, capsys, port):
    pytest.importorskip("optuna_dashboard")
    assert "--port must be in 1-65535" in _fails(["dashboard", "tiny", "--port", port], capsys)


def test_dashboard_port_in_use(in_tmp, capsys):
    pytest.importorskip("optuna_dashboard")
    spec_path = write_study(in_tmp)
    from paretoslim.search._study import open_study

    open_study(load_spec(spec_path))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = _fails(["dashboard", "tiny", "--port", str(port)], capsys)
    assert f"cannot serve on 127.0.0.1:{port}" in line and "another --port" in line


@pytest.mark.parametrize("argv", [["pick", "tiny", "--max-quality-drop", "nan"],
                                  ["verify", ".", "--tolerance", "nan", "--task", "t.py:f"]])
def test_nan_options_are_refused(in_tmp, capsys, argv):
    spec_path = write_study(in_tmp)
    from paretoslim.search._study import open_study

    open_study(load_spec(spec_path))
    assert "nan" in _fails(argv, capsys).lower()


def test_the_cli_never_shows_a_traceback_for_a_storage_error():
    """The same as a user sees it: a fresh process, its stderr one line."""
    url = f"postgresql://u:pw@127.0.0.1:{_closed_port()}/db"
    done = subprocess.run([sys.executable, "-m", "paretoslim.search.cli", "front", "tiny",
                           "--storage", url], capture_output=True, text=True)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert ":pw@" not in done.stderr


@pytest.mark.parametrize("argv, message", [
    (["dashboard", "x", "--port", "abc"], "dashboard: argument --port: invalid int value"),
    (["run"], "run: the following arguments are required: SPEC"),
    (["nope"], "argument VERB: invalid choice: 'nope'"),
    (["verify", "d", "--task", "t.py:f", "--spec", "s.toml"], "not allowed with argument"),
])
def test_bad_arguments_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("paretoslim: error: ")
    assert message in err and "--help" in err


def test_an_output_file_that_cannot_be_written_is_one_line(in_tmp, capsys):
    spec_path = write_study(in_tmp)
    from paretoslim.search._study import open_study

    open_study(load_spec(spec_path))
    line = _fails(["front", "tiny", "--out", str(in_tmp / "no" / "such" / "dir" / "f.csv")],
                  capsys)
    assert "No such file or directory" in line and "f.csv" in line


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_a_time_budget_must_be_a_positive_number(in_tmp, capsys, value):
    spec_path = write_study(in_tmp)
    line = _fails(["run", str(spec_path), "--time-budget", value], capsys)
    assert "--time-budget: time_budget_s must be" in line
    assert not (in_tmp / "runs").exists()
    spec_path.write_text(f"time_budget_s = {value}\n" + spec_path.read_text())
    assert "time_budget_s must be" in _fails(["run", str(spec_path)], capsys)
