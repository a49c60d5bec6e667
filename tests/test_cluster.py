"""Runs on real components: processes killed with SIGKILL, PostgreSQL workers, a Ray cluster."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import optuna
import pytest
from _servers import RAY_ENV, RAY_HEAD, RAY_WORKER, end_session, start_in_session
from _tiny import tiny_task, write_study
from optuna.trial import TrialState

from paretoslim.search import TrialResult, load_spec
from paretoslim.search._storage import make_storage
from paretoslim.search._store import StudyStore
from paretoslim.search._study import open_study

record = StudyStore.record

pytestmark = pytest.mark.xdist_group("cluster")  # one worker: servers, process counts

CLI = [sys.executable, "-m", "paretoslim.search.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _study(location):
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.load_study(study_name="tiny", storage=make_storage(str(location)))


def _states(study):
    return [t.state for t in study.get_trials(deepcopy=False)]


def _wait_for(condition, timeout_s, what, process=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended (status {process.returncode}) before "
                                 f"{what}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _finish(argv, timeout_s, **kwargs) -> subprocess.CompletedProcess:
    """Run ``argv`` to its end; past ``timeout_s`` it is aborted and the assertion shows
    where each of its threads was (Python's fault handler) and what it printed."""
    env = {**kwargs.pop("env", os.environ), "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, **kwargs)
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        out, err = process.communicate()
        raise AssertionError(f"{argv[3:]} still ran after {timeout_s} s\n--- stdout\n"
                             f"{out[-3000:]}\n--- stderr\n{err[-12000:]}") from None
    return subprocess.CompletedProcess(argv, process.returncode, out, err)


def _journal_ready(path):
    def ready():
        if not path.is_file():
            return None
        try:
            study = _study(path)
        except KeyError:
            return None
        states = _states(study)
        return study if TrialState.COMPLETE in states and TrialState.RUNNING in states else None
    return ready


@pytest.fixture
def processes():
    """Sessions started by a test, all ended afterwards."""
    started = []
    yield started
    for process in started:
        end_session(process.pid)


def _resumed(journal, completed: int):
    """The study after a resume: exactly ``completed`` trials complete with a recipe of
    their own, none left running or waiting, and every failure an interrupted trial."""
    study = _study(journal)
    states = _states(study)
    assert sum(t.state == TrialState.COMPLETE and record(t).duplicate_of is None
               for t in study.get_trials()) == completed
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    for trial in study.get_trials(states=(TrialState.FAIL,)):
        assert record(trial).failure.startswith("interrupted")
    return study


def test_a_local_run_killed_mid_study_resumes_to_exactly_the_requested_trials(
        tmp_path, processes):
    spec_path = write_study(tmp_path, trials=3)
    journal = tmp_path / "runs" / "tiny" / "journal.log"
    run = start_in_session([*CLI, "run", str(spec_path), "--quiet"], cwd=tmp_path, env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    processes.append(run)
    before = _wait_for(_journal_ready(journal), 240, "a completed and a running trial", run)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    kept = {t.number: t.values for t in before.get_trials(states=(TrialState.COMPLETE,))}

    again = _finish([*CLI, "run", str(spec_path), "--quiet"], 600, cwd=tmp_path, env=ENV)
    assert again.returncode == 0, again.stderr
    study = _resumed(journal, completed=3)
    done = {t.number: t.values for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert all(done[number] == values for number, values in kept.items())


@pytest.mark.postgres
def test_first_workers_create_a_new_database_study_at_once_without_crashing(
        tmp_path, postgres_url):
    write_study(tmp_path, trials=1)
    code = ("import sys\nfrom paretoslim.search import load_spec\n"
            "from paretoslim.search._study import open_study\n"
            "open_study(load_spec(sys.argv[1]), sys.argv[2])\n")
    starters = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "study.toml"),
                                  postgres_url], stderr=subprocess.PIPE, text=True)
                for _ in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in starters]
    assert [p.returncode for p in starters] == [0] * 4, errors
    summaries = optuna.get_all_study_summaries(make_storage(postgres_url))
    assert [s.study_name for s in summaries] == ["tiny"]


@pytest.mark.postgres
def test_a_second_run_of_a_study_in_postgresql_exits_2_naming_the_holder(tmp_path,
                                                                         postgres_url):
    import socket

    from paretoslim.search._lease import study_lease

    spec_path = write_study(tmp_path, trials=1)
    study = open_study(load_spec(spec_path), postgres_url)
    with study_lease(study, postgres_url) as held:
        assert held
        second = _finish([*CLI, "run", str(spec_path), "--storage", postgres_url, "--quiet"],
                         120, cwd=tmp_path, env=ENV)
    assert second.returncode == 2, second.stderr
    line = second.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert f"is being run by {socket.gethostname()}:{os.getpid()} since" in line
    with study_lease(open_study(load_spec(spec_path), postgres_url), postgres_url) as held:
        assert held  # released with the block


@pytest.mark.postgres
def test_two_workers_share_a_study_and_a_killed_workers_trial_is_retried(
        tmp_path, postgres_url, processes):
    spec_path = write_study(tmp_path, trials=4)
    with spec_path.open("a") as spec:
        spec.write("[workers]\nheartbeat_s = 1\ngrace_s = 4\nmax_retries = 2\n")
    argv = [*CLI, "worker", str(spec_path), "--storage", postgres_url, "--quiet"]
    workers = [start_in_session(argv, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    processes.extend(workers)
    victim, survivor = workers

    def victim_is_training():
        try:
            study = _study(postgres_url)
        except KeyError:
            return None
        return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if (record(t).worker or "").endswith(f":{victim.pid}")]

    lost = _wait_for(victim_is_training, 240, "the first worker to start a trial", victim)[0]
    time.sleep(1.0)
    os.killpg(victim.pid, signal.SIGKILL)  # the worker and its measuring process
    victim.wait()
    out, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, err

    study = _study(postgres_url)
    trials = study.get_trials()
    states = [t.state for t in trials]
    assert sum(t.state == TrialState.COMPLETE and record(t).duplicate_of is None
               for t in trials) == 4  # a repeated recipe copies its figures, uncounted
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    # every failed trial was lost by a dead worker and retried exactly once, by a trial that
    # completed; nothing else failed, and no trial ran twice
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert lost.number in [t.number for t in failed]
    for trial in failed:
        assert record(trial).failure.startswith("lost")
        retries = [t for t in trials if t.system_attrs.get("failed_trial") == trial.number]
        assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
        assert retries[0].params == trial.params
    workers_seen = {record(t).worker for t in trials if record(t).worker}
    assert any(w.endswith(f":{victim.pid}") for w in workers_seen)
    assert any(w.endswith(f":{survivor.pid}") for w in workers_seen)
    assert "4 completed trials" in out


@pytest.mark.ray
def test_a_ray_study_runs_on_two_nodes_times_on_the_target_and_resumes_after_a_kill(
        tmp_path, ray_cluster, processes):
    spec_path = write_study(tmp_path, trials=4)
    with spec_path.open("a") as spec:
        spec.write("[ray]\nmax_concurrent_trials = 2\n")
    journal = tmp_path / "runs" / "tiny" / "journal.log"
    argv = [*CLI, "run", str(spec_path), "--backend", "ray", "--address", ray_cluster.address]
    env = {**ENV, **RAY_ENV}
    driver = start_in_session([*argv, "--quiet"], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    processes.append(driver)
    _wait_for(_journal_ready(journal), 300, "a completed and a running trial", driver)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()

    again = _finish(argv, 600, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming the Ray Tune experiment" in again.stdout
    # trials running at the kill were resumed under their Optuna trial; only one asked for
    # in the last second before the kill could be unknown to the restored experiment
    study = _resumed(journal, completed=4)
    completed = study.get_trials(states=(TrialState.COMPLETE,))
    metrics = [record(t).metrics for t in completed if record(t).duplicate_of is None]
    assert {m["trained_on_node"] for m in metrics} == {RAY_HEAD, RAY_WORKER}
    # only the head holds the target resource: every latency was measured there
    assert {m["measured_on_node"] for m in metrics} == {RAY_HEAD}
    assert all(m["measured_on_target"] for m in metrics)
    assert (tmp_path / "runs" / "tiny" / "ray" / "tiny" / "tuner.pkl").is_file()

    front = subprocess.run([*CLI, "front", "tiny", "--format", "json"], cwd=tmp_path,
                           env=ENV, capture_output=True, text=True, timeout=120)
    assert front.returncode == 0, front.stderr
    assert {p["number"] for p in json.loads(front.stdout)} <= {t.number for t in completed}
    assert open_study(load_spec(spec_path)).study_name == "tiny"


def _restored_searcher(tmp_path, suggested: int, saved_after: int, held: int):
    """A searcher that suggested trials "t0", "t1"... up to ``suggested`` and was saved
    after ``saved_after``, restored where the experiment still runs the first ``held``."""
    pytest.importorskip("ray.tune", reason="needs ray[tune]: pip install -e '.[test]'")
    from types import SimpleNamespace

    from paretoslim.search._ray_search import FollowExperiment, StudySearch

    spec, journal = load_spec(write_study(tmp_path, trials=3)), str(tmp_path / "journal.log")
    searcher = StudySearch(spec, journal, max_failures=5)
    assert searcher.set_max_concurrency(2)
    configs = []
    for n in range(suggested):
        configs.append(searcher.suggest(f"t{n}"))
        if n + 1 == saved_after:
            searcher.save(str(tmp_path / "searcher.pkl"))
    assert searcher.suggest("over") is None  # two running: the limit
    # the driver dies; Tune restores its own trials and the searcher's last save
    restored = pickle.loads(pickle.dumps(searcher))
    restored.restore(str(tmp_path / "searcher.pkl"))
    trials = [SimpleNamespace(trial_id=f"t{n}", config=configs[n], is_finished=lambda: False)
              for n in range(held)]
    trials.append(SimpleNamespace(trial_id="old", config={}, is_finished=lambda: True))
    FollowExperiment().on_step_begin(iteration=0, trials=trials)
    return restored, _study(journal)


def test_a_restored_ray_searcher_forgets_a_trial_its_experiment_never_held(tmp_path):
    searcher, study = _restored_searcher(tmp_path, suggested=2, saved_after=2, held=1)
    assert isinstance(searcher.suggest("next"), dict)  # "t1" no longer holds a place
    assert searcher.suggest("over") is None
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.RUNNING, TrialState.FAIL,
                                         TrialState.RUNNING]
    assert record(trials[1]).failure.startswith("interrupted")


def test_a_restored_ray_searcher_adopts_a_trial_saved_only_by_its_experiment(tmp_path):
    searcher, study = _restored_searcher(tmp_path, suggested=2, saved_after=1, held=2)
    assert searcher.suggest("over") is None  # "t1" is running again, and counted
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING] * 2
    assert searcher._numbers == {"t0": 0, "t1": 1}


def test_a_ray_searcher_suggests_nothing_once_the_time_budget_is_spent(tmp_path):
    pytest.importorskip("ray.tune", reason="needs ray[tune]: pip install -e '.[test]'")
    import dataclasses

    from ray.tune.search import Searcher

    from paretoslim.search._ray_search import StudySearch

    spec, journal = load_spec(write_study(tmp_path, trials=3)), str(tmp_path / "journal.log")
    roomy = StudySearch(dataclasses.replace(spec, time_budget_s=3600.0), journal, 5)
    assert isinstance(roomy.suggest("t0"), dict)
    spent = StudySearch(dataclasses.replace(spec, name="spent", time_budget_s=1e-6), journal,
                        5)
    assert spent.suggest("t1") == Searcher.FINISHED


def _stopped_before(tmp_path):
    """A journal study whose trial 0 ran the recipe ``params`` and was stopped, with that
    recipe proposed next."""
    from _tiny import recorded_trial

    spec, journal = load_spec(write_study(tmp_path, trials=3)), str(tmp_path / "journal.log")
    params = {"student.width": 0.5, "pruning.ratio": 0.25, "quantization.scheme": "fp32"}
    study = open_study(spec, journal)
    recorded_trial(study, recipe=spec.space.recipe(params).to_dict(),
                   stopped="stopped at fine-tune step 5/20", state=TrialState.PRUNED)
    study.enqueue_trial(params)
    return spec, journal, params


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_a_recipe_stopped_before_is_never_run_again(tmp_path, backend):
    """The shared flow refuses it on every backend: marked a repeat of trial 0's stop, and
    the next trial runs another recipe."""
    spec, journal, params = _stopped_before(tmp_path)
    ran = []
    if backend == "local":
        from paretoslim.search._local import Objective
        from paretoslim.search._progress import StudyProgress
        from paretoslim.search._tally import RunTally

        objective = Objective(spec, tiny_task("mlp"), None,
                              StudyProgress(target=3, completed=0, enabled=False),
                              RunTally(3, None))
        objective._trial = lambda recipe, guide: ran.append(recipe) or TrialResult(
            recipe, failure="not run here")
        study = open_study(spec, journal)
        study.optimize(objective, n_trials=1, catch=(Exception,))
        objective.flow.count(study, "repeat")  # as the local loop does after the trial
        study.optimize(objective, n_trials=1, catch=(Exception,))
    else:
        pytest.importorskip("ray.tune", reason="needs ray[tune]: pip install -e '.[test]'")
        from paretoslim.search._ray_search import StudySearch

        config = StudySearch(spec, journal, max_failures=5).suggest("t0")
        ran.append(spec.space.recipe(config["params"]))
    repeat = _study(journal).trials[1]
    assert repeat.state == TrialState.PRUNED and record(repeat).duplicate_of == 0
    assert record(repeat).stopped == "stopped at fine-tune step 5/20"
    assert len(ran) == 1 and ran[0] != spec.space.recipe(params)
