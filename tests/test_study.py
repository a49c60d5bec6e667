import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
from _tiny import write_study
from optuna.trial import TrialState

from paretoslim.search import (
    ParetoslimError,
    _storage,
    load_spec,
    pareto_front,
    render_front,
    resolve_study,
    run_study,
)
from paretoslim.search._record import TrialRecord
from paretoslim.search._storage import make_storage, storage_of
from paretoslim.search._store import StudyStore
from paretoslim.search._study import open_study
from paretoslim.search.cli import main

record = StudyStore.record


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _completed(study):
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def test_run_records_objectives_metrics_and_constraint_then_resumes(in_tmp):
    spec = load_spec(write_study(in_tmp, trials=2))
    study = run_study(spec, progress=False)
    first = _completed(study)
    assert len(first) == 2
    assert (in_tmp / "runs" / "tiny" / "journal.log").is_file()
    for t in first:
        m = record(t).metrics
        assert t.values == [m["quality"], m["latency_ms"], m["size_mb"]]
        for key in ("baseline_quality", "baseline_latency_ms", "baseline_size_mb", "speedup",
                    "compression"):
            assert m[key] > 0
        assert t.system_attrs["constraints:max_quality_drop"] == pytest.approx(
            m["quality_drop"] - 0.01)
        assert record(t).recipe == spec.space.recipe(t.params).to_dict()
        assert {"student", "pruning", "low_rank", "distillation",
                "quantization"} <= set(record(t).recipe)

    # what a run writes is what the read verbs accept: no record is left out of their copy
    warnings = []
    StudyStore(study).readable_copy(warnings.append)
    assert warnings == []

    # resume: completed trials kept, the count of distinct recipes topped up to the target
    again = run_study(spec, trials=3, progress=False)
    done = [t for t in _completed(again) if record(t).duplicate_of is None]
    assert len(done) == 3
    kept = {t.number: t.values for t in done}
    assert all(kept[t.number] == t.values for t in first)
    # asking for what is already there runs nothing
    assert len(run_study(spec, trials=3, progress=False).trials) == len(again.trials)


def test_failed_trials_are_recorded_with_reason_and_the_study_goes_on(in_tmp):
    spec = load_spec(write_study(in_tmp, trials=2, width="[0.5, 0.75, 1.0]", broken=True))
    for width in (0.5, 1.0):
        open_study(spec).enqueue_trial({"student.width": width, "pruning.ratio": 0.0,
                                        "quantization.scheme": "fp32"})
    study = run_study(spec, progress=False)
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    assert len(_completed(study)) == 2
    assert [t.number for t in failed][:1] == [0]
    for t in failed:
        assert "this student family has no narrow members" in record(t).failure
    table = render_front(study, all_trials=True)
    assert "fail" in table and "no narrow members" in table


def test_a_study_that_always_fails_stops(in_tmp):
    spec = load_spec(write_study(in_tmp, trials=2, width="0.5", broken=True))
    study = run_study(spec, progress=False)
    assert len(_completed(study)) == 0
    assert len(study.get_trials(states=(TrialState.FAIL,))) == 5  # five failures in a row


def test_trials_of_a_killed_process_are_marked_failed_on_resume(in_tmp):
    spec = load_spec(write_study(in_tmp, trials=1))
    study = open_study(spec)
    study.ask()  # a trial left running, as by a killed process
    StudyStore.expect_heartbeats(study.ask(), "lost")  # a worker's, maybe still running
    study = run_study(spec, progress=False)
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.RUNNING, TrialState.COMPLETE]
    assert "interrupted" in record(study.trials[0]).failure


def test_front_json_export_and_cli(in_tmp, capsys):
    spec_path = write_study(in_tmp, trials=2)
    assert main(["run", str(spec_path), "--quiet"]) == 0
    capsys.readouterr()

    assert main(["front", "tiny", "--format", "json"]) == 0
    front = json.loads(capsys.readouterr().out)
    assert front and set(front[0]) == {"number", "values", "recipe", "metrics"}
    assert set(front[0]["values"]) == {"quality", "latency_ms", "size_mb"}

    assert main(["front", str(spec_path), "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("trial,quality,")

    number = front[0]["number"]
    out = in_tmp / "artifact"
    assert main(["export", "tiny", "--trial", str(number), "--out", str(out)]) == 0
    for name in ("model.pt2", "recipe.json", "metrics.json", "card.md"):
        assert (out / name).is_file()
    assert json.loads((out / "recipe.json").read_text()) == front[0]["recipe"]
    exported = json.loads((out / "metrics.json").read_text())
    # re-applying the recipe reproduces the search-time quality
    assert exported["export_quality"] == pytest.approx(front[0]["values"]["quality"], abs=0.01)
    program = torch.export.load(str(out / "model.pt2")).module()
    study, _ = resolve_study("tiny")
    assert program(torch.randn(3, 16)).shape == (3, 4)
    assert "Speedup" in (out / "card.md").read_text()
    assert study.study_name == "tiny"


@pytest.mark.parametrize("argv, message", [
    (["run", "missing.toml"], "missing.toml: study spec not found"),
    (["front", "nostudy"], "no study 'nostudy'"),
    (["export", "nostudy", "--trial", "0", "--out", "x"], "no study 'nostudy'"),
])
def test_cli_errors_are_one_line_without_traceback(in_tmp, argv, message):
    result = subprocess.run([sys.executable, "-m", "paretoslim.search.cli", *argv],
                            capture_output=True, text=True, cwd=in_tmp)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_bad_spec_key(in_tmp):
    (in_tmp / "bad.toml").write_text('task = "t.py:f"\n[finetune]\nstep = 3\n')
    result = subprocess.run([sys.executable, "-m", "paretoslim.search.cli", "run", "bad.toml"],
                            capture_output=True, text=True, cwd=in_tmp)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "paretoslim: error: bad.toml: unknown key 'finetune.step' in [finetune] (did you mean "
        "'steps'?); valid keys: learning_rate, steps, threads, trial_timeout_s")


def test_export_rejects_failed_or_missing_trials(in_tmp):
    spec = load_spec(write_study(in_tmp, trials=1))
    study = open_study(spec)
    trial = study.ask()
    study.tell(trial, state=TrialState.FAIL)
    from paretoslim.search import ParetoslimError, export_trial

    with pytest.raises(ParetoslimError, match="is fail, only completed"):
        export_trial(study, spec, trial.number, in_tmp / "out")
    with pytest.raises(ParetoslimError, match="has no trial 7"):
        export_trial(study, spec, 7, in_tmp / "out")
    assert isinstance(study, optuna.Study)


def test_a_repeated_recipe_reuses_the_measured_figures(in_tmp):
    spec = load_spec(write_study(in_tmp, trials=2, width="1.0"))
    params = {"pruning.ratio": 0.0, "quantization.scheme": "fp32"}
    study = open_study(spec)
    study.enqueue_trial(params)
    study.enqueue_trial(params)
    study = run_study(spec, progress=False)
    first, second = study.trials[:2]
    assert record(second).duplicate_of == first.number
    assert second.values == first.values
    assert record(second).metrics == record(first).metrics
    assert [p.number for p in pareto_front(study)].count(second.number) == 0


def test_a_recipe_stored_before_a_new_parameter_is_still_recognized(in_tmp):
    spec = load_spec(write_study(in_tmp, trials=2, width="1.0"))
    params = {"pruning.ratio": 0.0, "quantization.scheme": "fp32"}
    old = spec.space.recipe(params).to_dict()
    del old["pruning"]["heads"]  # as stored before pruning.heads existed
    study = open_study(spec)
    study.add_trial(optuna.trial.create_trial(
        values=[0.9, 1.0, 0.1], user_attrs={"recipe": old, "metrics": {"quality": 0.9}}))
    study.enqueue_trial(params)
    study = run_study(spec, progress=False)
    assert record(study.trials[1]).duplicate_of == 0
    assert study.trials[1].values == [0.9, 1.0, 0.1]


def test_cluster_sections_of_the_spec(in_tmp):
    spec_path = write_study(in_tmp)
    with spec_path.open("a") as spec:
        spec.write('[ray]\naddress = "auto"\ncpu = 0.5\nmax_concurrent_trials = 3\n'
                   '[workers]\nheartbeat_s = 2\ngrace_s = 5\n')
    spec = load_spec(spec_path)
    assert (spec.ray.address, spec.ray.cpu, spec.ray.gpu) == ("auto", 0.5, 0.0)
    assert spec.ray.max_concurrent_trials == 3 and spec.ray.time_on_target
    assert (spec.workers.heartbeat_s, spec.workers.grace_s, spec.workers.max_retries) == (2, 5, 2)
    assert spec.ray_results_path() == in_tmp / "runs" / "tiny" / "ray"


@pytest.mark.parametrize("extra, message", [
    ('backend = "dask"\n', "backend must be one of ['optuna', 'ray']. Got 'dask'."),
    ("[ray]\ncpu = -1\n", "ray.cpu must be in [0.0, 1024.0]. Got -1.0."),
    ("[ray]\nmax_concurrent = 2\n", "unknown key 'ray.max_concurrent' in [ray] (did you mean "
                                    "'max_concurrent_trials'?)"),
    ("[workers]\nheartbeat_s = 10\ngrace_s = 5\n", "workers.grace_s must be > heartbeat_s"),
])
def test_bad_cluster_settings_are_named(in_tmp, extra, message):
    spec_path = write_study(in_tmp)
    text = spec_path.read_text()
    spec_path.write_text(extra + text if not extra.startswith("[") else text + extra)
    with pytest.raises(ParetoslimError) as error:
        load_spec(spec_path)
    assert message in str(error.value)


def test_backends_are_chosen_by_name(in_tmp, monkeypatch):
    from paretoslim.search._run import BACKEND_IMPORT, get_backend
    from paretoslim.search._worker import run_shared

    assert get_backend("worker") is run_shared
    with pytest.raises(ParetoslimError) as error:
        get_backend("dask")
    assert str(error.value) == f"--backend must be one of {list(BACKEND_IMPORT)}. Got 'dask'."
    spec = load_spec(write_study(in_tmp))
    with pytest.raises(ParetoslimError, match=r"must be one of \['optuna', 'ray'\]. Got 'worker'"):
        run_study(spec, backend="worker", progress=False)
    # an optional backend whose library is missing says which extra installs it
    monkeypatch.delitem(sys.modules, "paretoslim.search._ray", raising=False)
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ParetoslimError, match=r"pip install 'paretoslim\[ray\]'"):
        run_study(spec, backend="ray", progress=False)


def test_a_worker_needs_a_database_storage(in_tmp, capsys):
    spec_path = write_study(in_tmp)
    assert main(["worker", str(spec_path), "--storage", "runs/x/journal.log"]) == 2
    assert "a worker needs a database storage shared by all workers" in capsys.readouterr().err


def test_simultaneous_first_workers_create_an_sqlite_study_once(in_tmp):
    write_study(in_tmp, trials=1)
    url = f"sqlite:///{in_tmp / 'shared.db'}"
    code = ("import sys\nfrom paretoslim.search import load_spec\n"
            "from paretoslim.search._study import open_study\n"
            "open_study(load_spec(sys.argv[1]), sys.argv[2])\n")
    starters = [subprocess.Popen([sys.executable, "-c", code, "study.toml", url], cwd=in_tmp,
                                 stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in starters]
    assert [p.returncode for p in starters] == [0] * 4, errors
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["tiny"]


def test_a_journal_lock_left_by_a_killed_writer_is_taken_over(in_tmp, monkeypatch):
    monkeypatch.setattr(_storage, "JOURNAL_LOCK_GRACE_S", 3)
    spec = load_spec(write_study(in_tmp, trials=1))  # journal at relative runs/tiny/
    open_study(spec)
    make_storage(storage_of(spec))._backend._lock.acquire()  # its writer killed: never released
    written = threading.Event()

    def write():
        open_study(spec).set_user_attr("after the kill", True)
        written.set()

    threading.Thread(target=write, daemon=True).start()
    assert written.wait(60), "the journal stayed locked"
    assert open_study(spec).user_attrs["after the kill"]


# --- one driver per study, signals, results that survive a kill -------------------------

SLOW_TIMING = "[latency]\nmin_calls = 20\nmin_seconds = 30.0\n"


def _slow_study(in_tmp):
    """A tiny study whose latency measurement takes a minute: a run is caught measuring."""
    spec_path = write_study(in_tmp, trials=2)
    text = spec_path.read_text().replace("[latency]\nmin_calls = 20\nmin_seconds = 0.0\n",
                                         SLOW_TIMING)
    assert SLOW_TIMING in text
    spec_path.write_text(text)
    return spec_path


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_measuring_run(in_tmp, spec_path):
    """``paretoslim run`` in a subprocess, returned once its first trial is being timed by
    a measuring process; with that process's id."""
    env = {**os.environ, "TMPDIR": str(in_tmp / "tmp"), "PARETOSLIM_CACHE": str(in_tmp / "c")}
    (in_tmp / "tmp").mkdir(exist_ok=True)
    run = subprocess.Popen([sys.executable, "-m", "paretoslim.search.cli", "run",
                            str(spec_path)], cwd=in_tmp, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and run.poll() is None:
        measuring = [p for p in _children(run.pid)
                     if b"paretoslim.evaluators._job" in Path(f"/proc/{p}/cmdline").read_bytes()]
        if measuring:
            return run, measuring[0]
        time.sleep(0.5)
    run.kill()
    raise AssertionError(f"no measuring process seen: {run.communicate()}")


def _stop(process, *orphans):
    """End what a test started and is still running (the run, a measuring process)."""
    if process.poll() is None:
        process.kill()
    process.communicate()
    for pid in orphans:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_fails_the_running_trial_with_its_name_and_ends_the_measuring_process(
        in_tmp, signum, status):
    spec_path = _slow_study(in_tmp)
    run, measuring = _start_measuring_run(in_tmp, spec_path)
    try:
        run.send_signal(signum)
        out, err = run.communicate(timeout=60)
    finally:
        _stop(run, measuring)
    name = signal.Signals(signum).name
    assert run.returncode == status, err
    assert err.strip().splitlines()[-1].startswith(f"paretoslim: interrupted by {name}")
    assert "Traceback" not in err and "\r" not in err  # a log, not progress bar frames
    assert not _alive(measuring)
    assert list((in_tmp / "tmp").glob("paretoslim-job-*")) == []
    study = open_study(load_spec(spec_path))
    trial = study.trials[0]
    assert trial.state == TrialState.FAIL
    assert record(trial).failure == f"interrupted by {name}"


def test_a_second_run_of_a_live_study_exits_2_and_leaves_its_trial_alone(in_tmp, capsys):
    spec_path = _slow_study(in_tmp)
    first, measuring = _start_measuring_run(in_tmp, spec_path)
    try:
        assert main(["run", str(spec_path), "--quiet"]) == 2
        line = capsys.readouterr().err.strip()
        assert len(line.splitlines()) == 1
        assert f"is being run by {socket.gethostname()}:{first.pid} since" in line
        study = open_study(load_spec(spec_path))
        assert [t.state for t in study.trials] == [TrialState.RUNNING]
        assert first.poll() is None
        # a run killed outright leaves its lease; the next run takes it over
        first.kill()
        first.wait()
        lease = in_tmp / "runs" / "tiny" / "journal.log.tiny.lease"
        assert lease.read_text().startswith(f"{socket.gethostname()}:{first.pid} ")
        spec_path.write_text(spec_path.read_text().replace("min_seconds = 30.0", ""))
        study = run_study(load_spec(spec_path), trials=1, progress=False)
    finally:
        _stop(first, measuring)
    assert study.trials[0].state == TrialState.FAIL
    assert "interrupted: the process running" in record(study.trials[0]).failure
    assert len(_completed(study)) == 1


def test_a_trial_whose_result_was_recorded_before_a_kill_is_completed_on_resume(in_tmp):
    from paretoslim.search import TrialResult

    spec = load_spec(write_study(in_tmp, trials=1))
    study = open_study(spec)
    trial = study.ask()
    recipe = spec.space.recipe({"student.width": 1.0, "pruning.ratio": 0.0,
                                "quantization.scheme": "fp32"})
    StudyStore.begin(trial, recipe.to_dict())
    result = TrialResult(recipe, {"quality": 0.9, "latency_ms": 1.0, "size_mb": 0.1},
                         {"quality": 0.9, "latency_ms": 1.0, "size_mb": 0.1,
                          "quality_drop": 0.001})
    values = StudyStore.write_result(trial, spec, result)
    # killed here: between the result's last write and Optuna's COMPLETE
    assert values == (0.9, 1.0, 0.1) and study.trials[0].state == TrialState.RUNNING
    study = run_study(spec, progress=False)
    assert len(study.trials) == 1  # it counts: nothing re-run, nothing lost
    kept = study.trials[0]
    assert kept.state == TrialState.COMPLETE and kept.values == [0.9, 1.0, 0.1]
    assert kept.system_attrs["constraints:max_quality_drop"] == pytest.approx(0.001 - 0.01)
    assert record(kept).failure is None


def test_a_stopped_or_failed_trial_left_running_keeps_its_own_outcome(in_tmp):
    spec = load_spec(write_study(in_tmp, trials=1))
    study = open_study(spec)
    stopped, failed, bare = study.ask(), study.ask(), study.ask()
    StudyStore.write(stopped, TrialRecord(metrics={"quality": 0.5},
                                          stopped="hopeless at rung 0.25"))
    StudyStore.note_failure(failed, "quality: RuntimeError: boom")
    assert StudyStore(study).mark_interrupted() == {"pruned": 1, "fail": 2}
    states = [(t.state, record(t).failure) for t in study.trials]
    assert states[0] == (TrialState.PRUNED, None)
    assert states[1] == (TrialState.FAIL, "quality: RuntimeError: boom")
    assert states[2][0] == TrialState.FAIL and "interrupted" in states[2][1]
    assert bare.number == 2


def test_progress_into_a_log_is_a_line_per_trial(in_tmp, capsys):
    spec = load_spec(write_study(in_tmp, trials=1))
    run_study(spec, progress=True)
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "\r" not in captured.out
    assert "trial   0  started (0/1 completed)  [" in captured.err
    assert "trial   0  quality" in captured.out
