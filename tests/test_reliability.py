"""A hostile or unlucky input (a damaged journal, a full disk, a bad task or spec, a run with
nothing left to try) ends in one line and exit 2, or in a readable result; nothing is lost."""

import errno
import json
import os
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
from _tiny import write_study

from paretoslim.search import TrialResult, load_spec
from paretoslim.search._storage import shown
from paretoslim.search._store import StudyStore
from paretoslim.search._study import open_study
from paretoslim.search.cli import main

record = StudyStore.record

READ_VERBS = (["front"], ["front", "--all"], ["front", "--format", "json"],
              ["front", "--sort", "speedup"], ["pick", "--max-quality-drop", "0.5"],
              ["report", "--out", "report.html", "--no-png"],
              ["export", "--trial", "0", "--out", "exported"])


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _ends_cleanly(argv, capsys) -> tuple[int, str]:
    """Run the CLI in this process: no traceback, exit 0 or 2 (then one line)."""
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert status in (0, 2), (status, err)
    if status == 2:
        errors = [line for line in err.strip().splitlines() if "error:" in line]
        assert len(errors) == 1, err
    return status, err


def stored_study(root, trials: int = 3, damage: dict | None = None):
    """A spec, its task file and a journal holding ``trials`` completed trials with made-up
    figures (the views read them; nothing here is measured); trial 1 then gets the user
    attributes ``damage``."""
    spec = load_spec(write_study(root, trials=trials))
    study = open_study(spec)
    for number in range(trials):
        trial = study.ask()
        recipe = spec.space.recipe({"student.width": 1.0, "pruning.ratio": 0.25 * number,
                                    "quantization.scheme": "int8_static"})
        StudyStore.begin(trial, recipe.to_dict())
        quality, latency, size = 0.9 - 0.01 * number, 1.0 / (number + 1), 0.1 / (number + 1)
        metrics = {"quality": quality, "quality_drop": 0.01 * number, "latency_ms": latency,
                   "size_mb": size, "speedup": number + 1.0, "compression": number + 1.0,
                   "baseline_quality": 0.9, "baseline_latency_ms": 1.0,
                   "baseline_size_mb": 0.1, "rungs": "0:0.5000,5:0.8000"}
        values = StudyStore.write_result(trial, spec, TrialResult(
            recipe, {"quality": quality, "latency_ms": latency, "size_mb": size}, metrics))
        for key, value in (damage or {}).items() if number == 1 else ():
            trial.set_user_attr(key, value)  # a stored record of another type
        study.tell(trial, values)
    return spec, study


# --- a full disk, a torn last line ------------------------------------------------------------


def test_a_full_disk_ends_the_run_in_one_line_and_the_next_run_resumes(in_tmp, capsys,
                                                                      monkeypatch):
    from optuna.storages.journal import JournalFileBackend

    spec_path = write_study(in_tmp, trials=2)
    real_append = JournalFileBackend.append_logs
    calls = {"n": 0}

    def full_after_some(self, logs):
        calls["n"] += 1
        if calls["n"] < 16:
            return real_append(self, logs)
        text = json.dumps(logs[0]).encode()
        with open(self._file_path, "ab") as handle:  # the write is cut short
            handle.write(text[: len(text) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._file_path)

    monkeypatch.setattr(JournalFileBackend, "append_logs", full_after_some)
    status, err = _ends_cleanly(["run", str(spec_path), "--quiet"], capsys)
    assert status == 2 and "No space left on device" in err, err
    journal = in_tmp / "runs" / "tiny" / "journal.log"
    assert not journal.read_bytes().endswith(b"\n")  # the torn line is there
    before = sum(t.state.name == "COMPLETE" for t in _load(journal))

    # a read verb ignores the torn line, and says so
    status, err = _ends_cleanly(["front", "tiny", "--all"], capsys)
    assert status == 0 and "incomplete" in err
    monkeypatch.setattr(JournalFileBackend, "append_logs", real_append)
    status, err = _ends_cleanly(["run", str(spec_path), "--quiet"], capsys)
    assert status == 0 and "removed an incomplete last record" in err
    trials = _load(journal)
    assert sum(t.state.name == "COMPLETE" and record(t).duplicate_of is None
               for t in trials) == 2
    assert sum(t.state.name == "COMPLETE" for t in trials) >= before
    assert _ends_cleanly(["front", "tiny"], capsys)[0] == 0


def _load(journal):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(journal)))
    return optuna.load_study(study_name="tiny", storage=storage).get_trials()


@pytest.mark.parametrize("damage, where", [
    (b"\x00\xff\xfe junk\n", "is not JSON"),
    (b"{not json}\n", "is not JSON"),
    (b'{"op_code": 99, "worker_id": "x"}\n', "no known operation code"),
    (b"[1, 2, 3]\n", "not a record"),
    (b'"text"\n', "not a record"),
    (b'{"op_code": 4, "worker_id": "x", "trial_id": 999, "param_name": "p"}\n', "line"),
])
@pytest.mark.parametrize("verb", [*READ_VERBS, ["run"]])
def test_a_damaged_journal_is_refused_in_one_line_by_every_verb(in_tmp, capsys, damage, where,
                                                                verb):
    spec, _ = stored_study(in_tmp)
    journal = in_tmp / "runs" / "tiny" / "journal.log"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:3]) + damage + b"".join(lines[3:]))
    size = journal.stat().st_size
    target = str(spec.path) if verb == ["run"] else "tiny"
    status, err = _ends_cleanly([verb[0], target, *verb[1:]], capsys)
    if status == 2:
        assert "journal" in err or "trials cannot be read" in err or "no trial" in err, err
    if b"op_code" not in damage or b"99" in damage:
        assert status == 2 and where in err, err  # refused, naming the line
    assert journal.stat().st_size == size  # nothing appended to a damaged journal


# --- records of another type, a database that is not Optuna's --------------------------------


@pytest.mark.parametrize("key, value", [
    ("metrics", "fast"), ("metrics", {"latency_ms": "fast"}), ("metrics", {"speedup": [1]}),
    ("metrics", {"rungs": "garbage"}), ("metrics", {"quality_drop": True}), ("recipe", 3),
    ("recipe", {"student": {"width": "wide"}}), ("values", ["a"]), ("duplicate_of", "x"),
    ("fail_reason", {"a": 1}),
])
def test_trial_records_of_another_type_are_left_out_with_a_warning(in_tmp, capsys, key, value):
    stored_study(in_tmp, damage={key: value})
    for verb in READ_VERBS:
        status, err = _ends_cleanly([verb[0], "tiny", *verb[1:]], capsys)
        assert "left out" in err, (verb, err)


def test_a_read_verb_writes_nothing_to_a_database_that_is_not_optunas(in_tmp, capsys):
    path = in_tmp / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (body TEXT)")
    before = path.read_bytes()
    status, err = _ends_cleanly(["front", "tiny", "--storage", f"sqlite:///{path}"], capsys)
    assert status == 2 and "holds no Optuna study tables" in err
    assert path.read_bytes() == before


# --- a run that would never end; repeats do not count -----------------------------------------

_GATE_TASK = """
import sys
sys.path.insert(0, {tests!r})
from _tiny import tiny_task

def make_task():
    task = tiny_task("mlp")
    teacher = task.model

    def metric(model, val):  # every student scores 0: no recipe passes the quality gate
        from paretoslim.evaluators import accuracy
        return accuracy(model, val) if model is teacher else 0.0

    task.metric = metric
    return task
"""

def _gate_spec(width: str) -> str:
    """The tiny study's spec with stopping on, one pruning ratio and one scheme."""
    from _tiny import SPEC

    return (SPEC.format(trials=4, width=width).replace('name = "tiny"', 'name = "gate"')
            .replace("enabled = false", "enabled = true").replace("steps = 5", "steps = 10")
            .replace("{ low = 0.0, high = 0.5, step = 0.25 }", "[0.0]")
            .replace('["fp32", "int8_static"]', '["fp32"]'))


@pytest.mark.parametrize("width, said", [
    ("[0.5, 1.0]", "every recipe of the space has been tried"),
    ("{ low = 0.5, high = 1.0 }", "trials in a row that completed nothing new"),
])
def test_a_run_where_every_recipe_is_stopped_ends_saying_why(in_tmp, width, said):
    from pathlib import Path

    (in_tmp / "task.py").write_text(_GATE_TASK.format(tests=str(Path(__file__).parent)))
    (in_tmp / "gate.toml").write_text(_gate_spec(width))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "paretoslim.search.cli", "run", "gate.toml"],
                          capture_output=True, text=True, timeout=300, cwd=in_tmp)
    assert done.returncode == 0, done.stderr
    assert said in done.stdout + done.stderr, done.stdout
    trials = _load_named(in_tmp / "runs" / "gate" / "journal.log", "gate")
    assert all(t.state.name == "PRUNED" for t in trials if t.state.is_finished())
    assert len(trials) <= 8 and time.monotonic() - started < 300
    recipes = [json.dumps(record(t).recipe, sort_keys=True) for t in trials
               if record(t).duplicate_of is None]
    assert len(recipes) == len(set(recipes))  # no stopped recipe was run twice


def _load_named(journal, name):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(journal)))
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def test_repeated_recipes_do_not_count_towards_the_trials(in_tmp, capsys):
    spec_path = write_study(in_tmp, trials=3, width="[1.0]")
    text = spec_path.read_text().replace('ratio = { low = 0.0, high = 0.5, step = 0.25 }',
                                         'ratio = [0.0]')
    spec_path.write_text(text.replace('scheme = ["fp32", "int8_static"]', 'scheme = ["fp32"]'))
    assert main(["run", str(spec_path)]) == 0
    captured = capsys.readouterr()
    assert "every recipe of the space has been tried (1 distinct" in captured.out
    from paretoslim.search._study import resolve_study

    study, _ = resolve_study("tiny")
    assert StudyStore(study).completed_count() == 1 and len(study.trials) <= 3


def test_the_time_budget_counts_from_the_first_trial(in_tmp, monkeypatch):
    """Loading the task (here: a teacher that takes 2 s to train) does not eat the budget."""
    from paretoslim.search import _local

    spec = load_spec(write_study(in_tmp, trials=2))
    spec = type(spec)(**{**spec.__dict__, "time_budget_s": 5.0})
    loaded_at, seen = [], []
    real_load = _local.load_task

    def slow_load(*args, **kwargs):
        time.sleep(2.0)
        task = real_load(*args, **kwargs)
        loaded_at.append(time.time())
        return task

    def quick_trial(task, recipe, settings, baseline, guide=None, **_):
        seen.append(guide.ends_at)
        return TrialResult(recipe, failure="not run here")

    monkeypatch.setattr(_local, "load_task", slow_load)
    monkeypatch.setattr(_local, "run_trial", quick_trial)
    _local.run_in_process(spec, target=2, storage=None, progress=False)
    assert seen and seen[0] >= loaded_at[0] + 5.0 - 0.05


def test_a_trial_past_its_time_limit_names_the_setting():
    from paretoslim.spaces import BudgetExceeded, Deadline

    with pytest.raises(BudgetExceeded, match=r"finetune.trial_timeout_s = 0 s during x"):
        Deadline(0.0, "finetune.trial_timeout_s").check("x")


# --- credentials, specs, tasks, bench -----------------------------------------------------------


@pytest.mark.parametrize("url, secret", [
    ("postgresql://user:s3cret@host/db", "s3cret"),
    ("postgresql://user:pa/ss@host/db", "pa/ss"),
    ("postgresql://user:p@ss:w/rd@host:5432/db", "p@ss:w/rd"),
    ("postgresql://user@host/db?password=s3cret&sslmode=require", "s3cret"),
    ("mysql+pymysql://u:sec%2Fret@h/db?charset=utf8", "sec%2Fret"),
    ("postgresql://host/db?user=u&PASSWORD=s3cret", "s3cret"),
])
def test_no_form_of_password_is_printed(url, secret):
    from paretoslim.search._storage import _first_line

    assert secret not in shown(url) and "***" in shown(url)
    assert secret not in _first_line(RuntimeError(f"cannot connect to {url}: {secret}"), url)
    assert "host" in shown(url) or "@h/" in shown(url)


def test_a_spec_that_is_not_utf8_is_one_line(in_tmp, capsys):
    (in_tmp / "bad.toml").write_bytes(b'task = "t.py:f"\nname = "\xff\xfe"\n')
    status, err = _ends_cleanly(["run", "bad.toml"], capsys)
    assert status == 2 and "not UTF-8" in err


def test_a_range_with_too_many_grid_points_is_one_line(in_tmp, capsys):
    spec_path = write_study(in_tmp)
    spec_path.write_text(spec_path.read_text().replace(
        "ratio = { low = 0.0, high = 0.5, step = 0.25 }",
        "ratio = { low = 0, high = 1e308, step = 1e-300 }"))
    status, err = _ends_cleanly(["run", str(spec_path)], capsys)
    assert status == 2 and "grid points" in err


_BAD_TASK = """
import sys
sys.path.insert(0, {tests!r})
import torch
from _tiny import tiny_task

def make_task(kind):
    task = tiny_task("mlp")
    if kind == "empty val":
        task.val = []
    elif kind == "mixed shapes":
        task.val = [(torch.randn(8, 16), torch.zeros(8, dtype=torch.long)),
                    (torch.randn(8, 5), torch.zeros(8, dtype=torch.long))]
    elif kind == "not pairs":
        task.val = [torch.randn(8, 16)]
    elif kind == "metric raises":
        task.metric = lambda model, val: 1 / 0
    elif kind == "metric text":
        task.metric = lambda model, val: "0.9"
    elif kind == "metric nan":
        task.metric = lambda model, val: float("nan")
    return task
"""


@pytest.mark.parametrize("kind", ["empty val", "mixed shapes", "not pairs", "metric raises",
                                  "metric text", "metric nan"])
def test_a_task_whose_quality_cannot_be_measured_is_one_line(in_tmp, capsys, kind):
    from pathlib import Path

    spec_path = write_study(in_tmp)
    (in_tmp / "task.py").write_text(_BAD_TASK.format(tests=str(Path(__file__).parent)))
    spec_path.write_text(spec_path.read_text() + f'[task_options]\nkind = "{kind}"\n')
    status, err = _ends_cleanly(["run", str(spec_path), "--quiet"], capsys)
    assert status == 2 and "teacher" in err, err
    assert not list((in_tmp / "runs" / "tiny").glob("*.log")) or not _load_named(
        in_tmp / "runs" / "tiny" / "journal.log", "tiny")


def test_bench_refuses_a_thread_count_it_cannot_start(capsys):
    status, err = _ends_cleanly(["bench", "kernels", "--threads", "100000"], capsys)
    assert status == 2 and "--threads must be in [1, 1024]" in err


# --- progress of long phases -------------------------------------------------------------------


def test_a_long_phase_writes_a_line_with_the_time_left_into_a_log(tmp_path):
    import io

    from paretoslim.spaces import PhaseProgress

    log = io.StringIO()
    with PhaseProgress("teacher training", 4, terminal=False, every_s=0.0, stream=log) as bar:
        for _ in range(4):
            time.sleep(0.01)
            bar.update(1, loss="0.5")
    lines = log.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[1].startswith("teacher training: step 2/4 (50%), about ")
    assert lines[1].endswith(" s left, loss 0.5")
    quiet = io.StringIO()
    with PhaseProgress("x", 4, terminal=False, every_s=3600.0, stream=quiet) as bar:
        bar.update(4)
    assert quiet.getvalue() == ""  # at most one line per interval


def test_a_trials_fine_tune_shows_its_steps_into_a_log(capsys, monkeypatch):
    from paretoslim.search import _progress

    monkeypatch.setattr(_progress, "LOG_EVERY_S", 0.0)
    progress = _progress.StudyProgress(target=2, completed=0, terminal=False)
    progress.current = "#0 [width=0.5]"
    for step in range(1, 4):
        progress.fine_tune_step(step, 10)
    err = capsys.readouterr().err.splitlines()
    assert "#0 [width=0.5]  fine-tune step 3/10, about " in err[-1] and "s left" in err[-1]
    progress.close()
