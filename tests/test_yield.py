"""What saves a study work: stopping at rungs, the quality gate, the structure cache, seeds."""

import pytest
from _tiny import TASK_FILE, tiny_task
from optuna.trial import TrialState

from paretoslim.evaluators import LATENCY_FIGURES
from paretoslim.search import (
    ParetoslimError,
    TrialSettings,
    load_spec,
    measure_baseline,
    pareto_front,
    parse_spec,
    run_study,
    run_trial,
)
from paretoslim.search._guide import Guide
from paretoslim.search._sampling import auto_seeds
from paretoslim.search._spec import FinetuneSpec, LatencySpec, StoppingSpec
from paretoslim.search._store import StudyStore
from paretoslim.spaces import Recipe

STOPPING = StoppingSpec(rungs=[0.25, 0.5], slice_samples=128)


@pytest.fixture(scope="module")
def mlp():
    task = tiny_task("mlp")
    return task, measure_baseline(task)


HALF = {"pruning": {"ratio": 0.5}}


@pytest.fixture
def trial(mlp):
    """``trial(recipe, steps=, overlap=, guide=, ...)``: one trial of the tiny MLP, its latency
    measured by a FakeMeasure; returns the result and the measure."""
    task, baseline = mlp

    def run(recipe=HALF, *, steps=40, overlap=True, **kwargs):
        measure = kwargs.pop("measure", None) or FakeMeasure()
        result = run_trial(task, Recipe.from_dict(recipe), _settings(steps, overlap), baseline,
                           measure=measure, **kwargs)
        return result, measure

    return run


def _settings(steps=40, overlap=True):
    return TrialSettings(FinetuneSpec(steps=steps, trial_timeout_s=None),
                         LatencySpec(min_calls=20, min_seconds=0.0, overlap=overlap))


class FakeMeasure:
    """Stands in for the latency measurement: counts calls, returns fixed figures."""

    def __init__(self):
        self.calls = 0

    def __call__(self, job):
        self.calls += 1
        figures = {k: 1.0 for k in LATENCY_FIGURES}
        figures.update(latency_noisy=False, lowering="aoti", measured_on="here",
                       sparse_execution="none")
        return type("Report", (), {"metrics": lambda self: dict(figures)})()


def test_a_hopeless_curve_is_stopped_at_a_rung_with_its_figures(trial):
    result, measure = trial(overlap=False,
                            guide=Guide(stopping=STOPPING, max_quality_drop=-100.0))
    assert result.stopped is not None and "stopped at fine-tune step 10/40" in result.stopped
    assert not result.ok and result.failure is None and measure.calls == 0
    assert result.metrics["stopped_at_step"] == 10
    assert result.metrics["rungs"].startswith("0:") and ",10:" in result.metrics["rungs"]


def test_a_promising_curve_runs_to_the_end(trial):
    result, measure = trial(guide=Guide(stopping=STOPPING, max_quality_drop=100.0))
    assert result.ok and measure.calls == 1
    assert result.metrics["rungs"].count(":") == 3  # step 0 and both rungs
    assert result.metrics["finetune_steps"] == 40


def test_a_trial_above_the_quality_limit_is_not_timed(trial):
    result, measure = trial({"sparsity": {"ratio": 0.97}}, steps=1, overlap=False,
                            guide=Guide(stopping=StoppingSpec(rungs=[0.5]),
                                        max_quality_drop=0.0))
    assert result.stopped is not None and "above the limit 0 after its fine-tune" in \
        result.stopped
    assert measure.calls == 0 and result.metrics["quality_drop"] > 0


def test_the_structure_is_timed_while_it_fine_tunes(mlp):
    import threading

    task, baseline = mlp
    finetuned = threading.Event()
    calls = []

    def measure(job):  # records whether the fine-tune was still running when it began
        calls.append((threading.current_thread().name, finetuned.is_set()))
        return FakeMeasure()(job)

    def on_stage(name):
        if name == "quality":
            finetuned.set()

    result = run_trial(task, Recipe.from_dict({"pruning": {"ratio": 0.5}}), _settings(),
                       baseline, measure=measure, on_stage=on_stage)
    assert result.ok and result.metrics["latency_timed_before_finetune"]
    assert calls == [("paretoslim-latency", False)]
    sequential = []
    run_trial(task, Recipe.from_dict({"pruning": {"ratio": 0.5}}), _settings(overlap=False),
              baseline, measure=lambda job: sequential.append(finetuned.is_set()) or
              FakeMeasure()(job), on_stage=on_stage)
    assert sequential == [True]


@pytest.mark.parametrize("stop", ["rung", "interrupt"])
def test_a_trial_that_ends_early_ends_its_timing(mlp, monkeypatch, stop):
    from paretoslim.evaluators import MeasurementCancelled
    from paretoslim.search import _timing

    task, baseline = mlp
    cancelled = []

    def isolated(job, timeout_s=None, cancel=None):  # the measuring process, until ended
        cancelled.append(cancel.wait(timeout=60))
        raise MeasurementCancelled("the measurement was cancelled")

    monkeypatch.setattr(_timing, "run_isolated", isolated)

    fine_tunes = []

    def on_stage(name):  # the second fine-tune is the trial's, after its structure's
        fine_tunes.extend([name] * name.startswith("fine-tune"))
        if stop == "interrupt" and len(fine_tunes) == 2:
            raise KeyboardInterrupt

    guide = Guide(stopping=STOPPING, max_quality_drop=-100.0 if stop == "rung" else 100.0)
    try:
        result = run_trial(task, Recipe.from_dict({"pruning": {"ratio": 0.5}}), _settings(),
                           baseline, on_stage=on_stage, guide=guide)
        assert result.stopped is not None
    except KeyboardInterrupt:
        assert stop == "interrupt"
    assert cancelled == [True]


@pytest.mark.parametrize("scheme", ["fp32", "int8_static"])
def test_latency_is_reused_for_an_identical_structure_only(mlp, scheme):
    # int8 static: calibration sets other scales for other weights, the kernels are the same
    task, baseline = mlp
    measure = FakeMeasure()

    def recipe(ratio, **distillation):
        return Recipe.from_dict({"pruning": {"ratio": ratio}, "distillation": distillation,
                                 "quantization": {"scheme": scheme}})

    first = run_trial(task, recipe(0.25), _settings(4), baseline, measure=measure)
    fingerprint = first.metrics["structure"]
    cached = {fingerprint: {**{k: first.metrics[k] for k in LATENCY_FIGURES
                               if k in first.metrics}, "latency_cached_from": 0}}
    guide = Guide(known_latency=cached.get)
    same = run_trial(task, recipe(0.25, temperature=2.0), _settings(4), baseline,
                     measure=measure, guide=guide)
    assert measure.calls == 1 and same.metrics["latency_cached_from"] == 0
    assert same.metrics["structure"] == fingerprint
    other = run_trial(task, recipe(0.5), _settings(4), baseline, measure=measure, guide=guide)
    assert measure.calls == 2 and "latency_cached_from" not in other.metrics
    assert other.metrics["structure"] != fingerprint
    if scheme == "int8_static":  # a zero point in use or not is another kernel
        symmetric = run_trial(task, Recipe.from_dict({
            "pruning": {"ratio": 0.25},
            "quantization": {"scheme": scheme, "activations": "symmetric"}}),
            _settings(4), baseline, measure=measure, guide=guide)
        assert symmetric.metrics["structure"] != fingerprint


def test_a_dominated_candidate_skips_its_fine_tune(mlp):
    task, baseline = mlp
    measure = FakeMeasure()
    first = run_trial(task, Recipe.from_dict({"pruning": {"ratio": 0.25}}), _settings(4),
                      baseline, measure=measure)
    cached = {first.metrics["structure"]: {"latency_ms": 1.0, "latency_cached_from": 0}}
    guide = Guide(stopping=STOPPING, max_quality_drop=0.01, known_latency=cached.get,
                  dominated=lambda latency, size: "trial 9" if latency >= 0.5 else None)
    skipped = run_trial(task, Recipe.from_dict({"pruning": {"ratio": 0.25},
                                                "distillation": {"alpha": 0.5}}),
                        _settings(4), baseline, measure=measure, guide=guide)
    assert skipped.stopped == "dominated before its fine-tune by trial 9"
    assert "rungs" not in skipped.metrics and measure.calls == 1


SPEC = """
task = "task.py:make_task"
name = "gated"
trials = 3
seed = 0
[[seeds]]
pruning.ratio = 0.25
[[seeds]]
pruning.ratio = 0.25
distillation.temperature = 2.0
[[seeds]]
sparsity.ratio = 0.97
low_rank.rank_fraction = 0.1
[constraints]
max_quality_drop = 0.02
[stopping]
rungs = [0.5]
skip_dominated = false
[sampler]
name = "random"
[finetune]
steps = 20
[latency]
lowering = "compile"  # the study's search is tested here, not AOTInductor
min_calls = 20
min_seconds = 0.0
[space.student]
width = [0.5, 1.0]
[space.pruning]
ratio = [0.0, 0.25]
[space.distillation]
temperature = [2.0, 4.0]
[space.sparsity]
ratio = [0.0, 0.97]
[space.low_rank]
rank_fraction = [0.1, 1.0]
"""


def test_a_study_runs_its_seeds_reuses_timings_and_keeps_stopped_trials(tmp_path,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "task.py").write_text(TASK_FILE)
    (tmp_path / "study.toml").write_text(SPEC)
    spec = load_spec(tmp_path / "study.toml")
    study = run_study(spec, progress=False)
    trials = study.get_trials(deepcopy=False)
    assert [t.params.get("pruning.ratio") for t in trials[:2]] == [0.25, 0.25]
    first, second = (StudyStore.record(t).metrics for t in trials[:2])
    assert second["structure"] == first["structure"]
    assert second["latency_cached_from"] == trials[0].number
    assert "latency_cached_from" not in first
    stopped = [t for t in trials if t.state == TrialState.PRUNED]
    assert stopped, "the third seed loses more than 2 points at 20 steps"
    assert all(StudyStore.record(t).stopped for t in stopped)
    front = {p.number for p in pareto_front(study)}
    assert front and not front & {t.number for t in stopped}
    again = run_study(spec, trials=4, progress=False)
    kept = {t.number: t.state for t in again.get_trials(deepcopy=False)}
    assert all(kept[t.number] == TrialState.PRUNED for t in stopped)


def test_auto_seeds_start_with_informative_recipes_inside_the_space():
    spec = parse_spec({"task": "t.py:f", "space": {
        "student": {"width": {"low": 0.5, "high": 1.0, "step": 0.125}},
        "pruning": {"ratio": {"low": 0.0, "high": 0.6, "step": 0.05}},
        "quantization": {"scheme": ["fp32", "bf16", "int8_static"]}}})
    seeds = auto_seeds(spec)
    assert 3 <= len(seeds) <= spec.sampler.population_size
    assert seeds[0] == {"student.width": 1.0, "pruning.ratio": 0.0,
                        "quantization.scheme": "int8_static"}
    assert {"student.width": 0.75, "pruning.ratio": 0.3,
            "quantization.scheme": "int8_static"} in seeds
    assert {"student.width": 0.5, "pruning.ratio": 0.0,
            "quantization.scheme": "int8_static"} in seeds
    # the small, fast compound comes right after the single techniques
    assert seeds[3] == {"student.width": 0.5, "pruning.ratio": 0.3,
                        "quantization.scheme": "int8_static"}
    for seed in seeds:
        spec.space.recipe(seed)  # every seed is a valid point of the space


def test_seeds_and_stopping_are_checked_in_the_spec():
    with pytest.raises(Exception, match="outside its domain"):
        parse_spec({"task": "t.py:f", "seeds": [{"pruning": {"ratio": 0.9}}]})
    with pytest.raises(Exception, match="rungs"):
        parse_spec({"task": "t.py:f", "stopping": {"rungs": [0.5, 2]}})
    with pytest.raises(Exception, match="seeds"):
        parse_spec({"task": "t.py:f", "seeds": "some"})


def test_a_recipe_stopped_before_is_marked_a_repeat_of_its_stop():
    from _tiny import recorded_study, recorded_trial

    study = recorded_study(objectives=("quality", "latency_ms"))
    recipe = Recipe.from_dict({"pruning": {"ratio": 0.6}}).to_dict()
    first = recorded_trial(study, recipe=recipe, stopped="stopped at fine-tune step 400/800",
                           state=TrialState.PRUNED)
    again = recorded_trial(study, recipe=recipe)
    assert StudyStore(study).copy_earlier(again) == (None, "stopped at fine-tune step 400/800")
    assert StudyStore.record(again).duplicate_of == first.number
    other = recorded_trial(study, recipe=Recipe().to_dict())
    assert StudyStore(study).copy_earlier(other) == (None, None)


# a limit above the teacher (max_quality_drop < 0) puts every curve in the promotion band;
# the gate then lets the trial through to be timed
PROMOTING = StoppingSpec(rungs=[0.25, 0.5], slice_samples=128, slack=1.0, promote_steps=80,
                         promote_margin=1.0, time_infeasible=True)


def test_a_near_miss_with_a_front_extending_structure_trains_longer(trial):
    result, measure = trial(guide=Guide(stopping=PROMOTING, max_quality_drop=-0.5,
                                        promotions_left=1))
    assert result.ok and result.metrics["finetune_steps"] == 80
    assert result.metrics["promoted_at_step"] == 20 and "promoted at" in \
        result.metrics["promoted"]
    assert result.metrics["rungs"].count(":") == 3  # no rung after the promotion
    # timed once, on the structure before its fine-tune, and reused for the trained model
    assert measure.calls == 1 and result.metrics["latency_timed_before_finetune"]


def test_a_promoted_trial_that_ends_above_the_limit_keeps_its_structure_latency(trial):
    stopping = StoppingSpec(rungs=[0.25, 0.5], slice_samples=128, slack=1.0,
                            promote_steps=80, promote_margin=1.0)
    result, measure = trial(guide=Guide(stopping=stopping, max_quality_drop=-0.5,
                                        promotions_left=1))
    assert result.stopped is not None and "after its fine-tune" in result.stopped
    assert result.metrics["latency_ms"] == 1.0 and measure.calls == 1
    assert "promoted at" in result.metrics["promoted"]


def test_a_promotion_fits_the_budget_at_the_pace_of_the_last_steps():
    import time

    from paretoslim.search._rung_policy import PACE_STEPS, RungPolicy

    policy = RungPolicy(None, None, Guide(ends_at=time.time() + 10.0), None, None, print,
                        print)
    now = time.perf_counter()
    policy.finetune_started = now - 100.0  # the first steps waited for a timing
    assert not policy._fits(100, 1000)  # at 1 s a step, 900 s more
    policy.step_ends.extend(now - 0.01 * k for k in reversed(range(PACE_STEPS + 1)))
    assert policy._fits(100, 1000)  # at the last steps' 10 ms, 9 s more
    assert not policy._fits(100, 2000)


@pytest.mark.parametrize("guide", [
    {"promotions_left": 0},  # the study's promotions are spent
    {"promotions_left": 1, "extends_front": lambda latency, size: False},
    {"promotions_left": 1, "max_quality_drop": 100.0},  # feasible with room to spare
    {"promotions_left": 1, "ends_at": 0.0},  # the run's time budget is spent
], ids=["none-left", "dominated-structure", "comfortable", "no-time-left"])
def test_a_trial_keeps_its_steps_unless_a_promotion_pays(trial, guide):
    guide = {"max_quality_drop": -0.5, **guide}  # as promoted above, but for one condition
    result, measure = trial(guide=Guide(stopping=PROMOTING, **guide))
    assert result.metrics["finetune_steps"] == 40 and "promoted" not in result.metrics
    assert measure.calls == 1  # the structure, timed once; its trained model reuses it


def test_the_study_guide_counts_promotions_and_knows_the_feasible_extremes():
    from _tiny import recorded_study, recorded_trial

    from paretoslim.search._guide import guide_data, guide_for

    spec = parse_spec({"task": "t.py:f", "stopping": {"promote_steps": 900, "promotions": 2}})
    study = recorded_study()
    for drop, latency, size, promoted in [(0.005, 2.0, 0.2, True), (0.02, 1.0, 0.1, False)]:
        metrics = {"quality_drop": drop, "latency_ms": latency, "size_mb": size,
                   **({"promoted": "promoted at step 400/800"} if promoted else {})}
        recorded_trial(study, metrics=metrics, values=[1 - drop, latency, size])
    guide = guide_for(spec, guide_data(study, spec))
    assert guide.promotions_left == 1
    assert guide.extends_front(1.5, 0.3) and guide.extends_front(3.0, 0.15)
    assert not guide.extends_front(2.0, 0.2)  # the infeasible trial does not count


@pytest.mark.parametrize("earlier, stopped", [
    ((1.0, 1e-3, 1e-6), True),   # two earlier trials ahead on every axis at this rung
    ((0.0, 1e3, 1e3), False)])   # two behind on every axis
def test_successive_halving_stops_a_trial_outranked_at_its_rung(trial, earlier, stopped):
    from paretoslim.search._stopping import RungPoint

    points = tuple(RungPoint(0.25, *earlier) for _ in range(2))
    guide = Guide(stopping=StoppingSpec(rungs=[0.25, 0.5], slice_samples=128, halving=2),
                  max_quality_drop=100.0, rung_points=points)
    result, measure = trial(guide=guide)
    assert measure.calls == 1  # the structure, timed once: at the rung, kept for the end
    if stopped:
        assert result.stopped.startswith("stopped by successive halving at 0.25")
        assert result.metrics["stopped_at_step"] == 10
        assert {"latency_ms", "size_mb"} <= result.metrics.keys()  # ranks later trials
    else:
        assert result.ok and result.metrics["finetune_steps"] == 40
        assert result.metrics["latency_timed_before_finetune"]


def test_the_study_guide_holds_each_timed_trial_at_its_rungs():
    from _tiny import recorded_study, recorded_trial

    from paretoslim.search._guide import guide_data, guide_for
    from paretoslim.search._stopping import RungPoint

    spec = parse_spec({"task": "t.py:f", "finetune": {"steps": 800},
                       "stopping": {"halving": 3}})
    study = recorded_study()
    for metrics in ({"quality_drop": 0.0, "latency_ms": 2.0, "size_mb": 0.2,
                     "rungs": "0:0.5,200:0.9,400:0.92"},
                    {"quality_drop": 0.0, "latency_ms": 1.0, "size_mb": 0.1}):  # no rungs
        recorded_trial(study, metrics=metrics,
                       values=[1.0, metrics["latency_ms"], metrics["size_mb"]])
    guide = guide_for(spec, guide_data(study, spec))
    assert guide.rung_points == (RungPoint(0.25, 0.9, 2.0, 0.2), RungPoint(0.5, 0.92, 2.0, 0.2))
    with pytest.raises(ParetoslimError, match="stopping.halving must be 0"):
        parse_spec({"task": "t.py:f", "stopping": {"halving": 1}})


def test_a_time_budget_ends_the_run_after_the_trial_running_then(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "task.py").write_text(TASK_FILE)
    (tmp_path / "study.toml").write_text(
        SPEC.replace("trials = 3", "trials = 3\ntime_budget_s = 0.001"))
    study = run_study(load_spec(tmp_path / "study.toml"), progress=False)
    ran = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                   TrialState.FAIL, TrialState.RUNNING))
    assert len(ran) == 1  # the seeds after it wait for a later run
    with pytest.raises(Exception, match="time_budget_s"):
        parse_spec({"task": "t.py:f", "time_budget_s": 0})


def test_a_drop_of_exactly_the_limit_is_feasible():
    from paretoslim.search._measuring import quality_drop

    assert 0.9337 - 0.9237 > 0.01  # the floating-point residue
    assert quality_drop(0.9337, 0.9237) <= 0.01
    assert quality_drop(0.9337, 0.9236) > 0.01


def test_a_fine_tune_from_a_trained_slice_is_not_stopped_for_its_first_dip():
    """A trained slice starts high and dips in its first, fast steps: its step-0 quality is
    not a point of its recovery curve, so the first rung after it projects no bound."""
    from paretoslim.search._rung_policy import RungPolicy
    from paretoslim.search._stopping import Rung, stop_reason

    policy = RungPolicy(None, None, Guide(), None, None, print, print)
    policy.curve = [Rung(0, 300, 0.923), Rung(75, 300, 0.915)]  # measured on Fashion-MNIST
    assert stop_reason(policy.projected_curve, 0.9285, 0.005) is not None
    policy.trained_start = True
    assert stop_reason(policy.projected_curve, 0.9285, 0.005) is None
    policy.curve.append(Rung(150, 300, 0.9275))  # recovering: projected past the limit
    assert stop_reason(policy.projected_curve, 0.9285, 0.005) is None
    policy.curve.append(Rung(225, 300, 0.9180))  # falling again: stopped
    assert stop_reason(policy.projected_curve, 0.9285, 0.005) is not None
