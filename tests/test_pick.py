import optuna
import pytest
from _tiny import recorded_study, recorded_trial

from paretoslim.search import ParetoslimError
from paretoslim.search._pick import PickRule, pick

# (quality_drop, latency_ms, size_mb); the teacher has quality 0.9
TRIALS = [
    (0.000, 10.0, 4.0),  # 0: no loss, slow, big
    (0.005, 4.0, 1.0),   # 1: balanced
    (0.009, 2.0, 2.0),   # 2: fastest within 0.01
    (0.030, 1.0, 0.2),   # 3: fastest overall, too lossy by default
    (0.006, 5.0, 1.2),   # 4: dominated by 1
]


@pytest.fixture
def study():
    study = recorded_study(max_quality_drop=0.01)
    for drop, latency, size in TRIALS:
        quality = 0.9 - drop
        recorded_trial(study, recipe={"pruning": {"ratio": 0.1}}, values=[quality, latency, size],
                       metrics={"quality": quality, "quality_drop": drop, "latency_ms": latency,
                                "size_mb": size, "speedup": 10.0 / latency,
                                "compression": 4.0 / size})
    failed = study.ask()
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    return study


def test_default_rule_is_lowest_latency_within_the_studys_quality_limit(study):
    chosen = pick(study, PickRule())
    assert chosen.point.number == 2
    assert "lowest latency_ms" in chosen.reason and "quality_drop <= 0.01" in chosen.reason


def test_constraints_and_objectives(study):
    assert pick(study, PickRule(max_quality_drop=0.05)).point.number == 3
    assert pick(study, PickRule(minimize="size_mb")).point.number == 1
    assert pick(study, PickRule(max_latency_ms=3.0, maximize="compression")).point.number == 2
    assert pick(study, PickRule(maximize="quality")).point.number == 0


def test_knee_is_a_pareto_point_balancing_the_objectives(study):
    chosen = pick(study, PickRule(knee=True))
    assert chosen.point.number == 1
    assert "knee" in chosen.reason


def test_no_trial_fits_names_the_closest(study):
    with pytest.raises(ParetoslimError, match="no trial .* meets .*closest: trial 2") as info:
        pick(study, PickRule(max_latency_ms=1.5))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("rule, message", [
    (dict(minimize="latency_ms", knee=True), "one of --minimize, --maximize or --knee"),
    (dict(max_size_mb=-1.0), "--max-size-mb must be >= 0"),
])
def test_bad_rules(rule, message):
    with pytest.raises(ParetoslimError, match=message):
        PickRule(**rule)


def test_unknown_figure(study):
    with pytest.raises(ParetoslimError, match="unknown figure 'accuracy'; choose from"):
        pick(study, PickRule(maximize="accuracy"))


def test_empty_study():
    empty = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    with pytest.raises(ParetoslimError, match="no completed trial"):
        pick(empty, PickRule())
