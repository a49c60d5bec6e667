"""The predicted tier: simulated numerics, estimated sizes, the speedup's interval, the
front's noise marks, prediction errors, and a tiny two-tier study end to end."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from _tiny import recorded_study, recorded_trial, tiny_task

from paretoslim.evaluators import LayerCall, estimated_size_mb, size_mb
from paretoslim.evaluators._latency import median_interval
from paretoslim.search._pareto import FrontPoint, within_noise
from paretoslim.search._record import prediction_errors
from paretoslim.search._store import StudyStore
from paretoslim.spaces import (
    Recipe,
    StudentConfig,
    compress,
    kind_formats,
    layer_formats,
    shared_weight_layers,
    simulate_numerics,
)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def cnn():
    return tiny_task("cnn")


def test_layer_formats_follow_the_scheme_and_the_float_layers(cnn):
    model = cnn.model
    static = layer_formats(model, "int8_static", ["stem.0"])
    assert static["stem.0"] == "fp32" and static["head.1"] == "int8"
    assert set(static) == {"stem.0", "block.0", "block.3", "head.1", "head.3"}
    dynamic = layer_formats(model, "int8_dynamic")
    assert dynamic["block.0"] == "fp32" and dynamic["head.1"] == "int8_dynamic"
    with pytest.raises(ValueError, match="no format is known"):
        layer_formats(model, "int3")


@pytest.mark.parametrize("scheme", ["bf16", "int8_static", "int8_weight_only", "int8_dynamic"])
def test_simulated_numerics_err_like_the_converted_model(cnn, scheme):
    """The simulation's output error against the float model is within a factor of two of
    the converted model's (it is a proxy of that error)."""
    model, x = cnn.model, cnn.val[0][0]
    calibration = [b[0] for b in cnn.train[:2]]
    simulated = simulate_numerics(copy.deepcopy(model), layer_formats(model, scheme),
                                  calibration)
    converted, _ = compress(model, Recipe.from_dict({"quantization": {"scheme": scheme}}),
                            example_input=cnn.example_input, train=cnn.train,
                            calibration=cnn.train[:2], finetune_steps=0, learning_rate=1e-3,
                            seed=0)
    with torch.no_grad():
        reference = model(x)
        sim = (simulated(x) - reference).abs().mean().item()
        real = (converted(x) - reference).abs().mean().item()
    assert real > 0 and 0.5 * real <= sim <= 2.0 * real


def test_simulated_int8_weights_take_at_most_255_levels_per_channel(cnn):
    model = simulate_numerics(copy.deepcopy(cnn.model), layer_formats(cnn.model,
                              "int8_weight_only"), [])
    weight = model.head[1].weight
    assert all(len(torch.unique(row)) <= 255 for row in weight)
    assert not torch.equal(weight, cnn.model.head[1].weight)


def test_kmeans_simulation_shares_the_codebook(cnn):
    formats = layer_formats(cnn.model, "fp32")
    model = simulate_numerics(copy.deepcopy(cnn.model), formats, [], cluster_bits=4,
                              clustered=["head.1"])
    assert len(torch.unique(model.head[1].weight)) <= 16
    assert torch.equal(model.head[3].weight, cnn.model.head[3].weight)


@pytest.mark.parametrize("scheme", ["fp32", "bf16", "int8_static", "int8_weight_only",
                                    "int8_static linear=bf16 kmeans4b"])
def test_estimated_size_is_within_5_percent_of_the_converted_size(cnn, scheme):
    mixed = scheme.endswith("kmeans4b")
    recipe = Recipe.from_dict({"quantization": {"scheme": scheme.split()[0]} | (
        {"linear": "bf16"} if mixed else {}), "weight_sharing": {"bits": 4 if mixed else 0}})
    converted, _ = compress(cnn.model, recipe, example_input=cnn.example_input,
                            train=cnn.train, calibration=cnn.train[:2], finetune_steps=0,
                            learning_rate=1e-3, seed=0)
    formats = layer_formats(cnn.model, recipe.quantization.scheme, [],
                            kind_formats(recipe.quantization))
    estimate = estimated_size_mb(cnn.model, formats, cluster_bits=recipe.weight_sharing.bits,
                                 clustered=shared_weight_layers(formats, []))
    assert estimate == pytest.approx(size_mb(converted), rel=0.05)


def test_median_interval_brackets_the_median():
    values = [float(v) for v in range(1, 101)]
    low, high = median_interval(values)
    assert low < 1.0 < high
    assert 0.75 < low and high < 1.25  # order statistics about sqrt(n) = 10 ranks away
    assert all(math.isnan(v) for v in median_interval([1.0, 2.0, 3.0]))
    narrow = median_interval([10.0 + 0.01 * i for i in range(100)])
    assert high - low > narrow[1] - narrow[0]


def _point(number, quality, latency, size, low, high):
    return FrontPoint(number, {"quality": quality, "latency_ms": latency, "size_mb": size},
                      {}, {"speedup_low": low, "speedup_high": high})


def test_points_whose_latency_difference_is_noise_are_marked():
    a = _point(0, 0.93, 1.0, 0.5, 7.0, 8.0)   # faster than b inside the noise
    b = _point(1, 0.93, 1.05, 0.4, 7.5, 8.5)  # smaller: its place is its size
    c = _point(2, 0.92, 0.5, 0.3, 14.0, 16.0)  # far faster: no overlap with anyone
    assert within_noise([a, b, c]) == {0}  # a is on the front only by a noisy latency
    d = _point(3, 0.93, 1.02, 0.5, 7.4, 8.2)  # as good as a except latency, inside noise
    assert within_noise([a, c, d]) == {0, 3}


def test_prediction_errors_are_relative_for_latency_and_size():
    errors = prediction_errors(
        {"candidate": 7, "predicted_latency_ms": 1.1, "predicted_size_mb": 0.9,
         "predicted_quality_drop": 0.004},
        {"latency_ms": 1.0, "size_mb": 1.0, "quality_drop": 0.006})
    assert errors["latency_prediction_error"] == pytest.approx(0.1)
    assert errors["size_prediction_error"] == pytest.approx(-0.1)
    assert "speedup_prediction_error" not in errors  # nothing predicted, nothing compared
    drift = prediction_errors({"predicted_latency_ms": 1.0, "predicted_speedup": 8.0},
                              {"latency_ms": 1.25, "speedup": 8.0})  # a slower process
    assert drift["latency_prediction_error"] == pytest.approx(-0.2)
    assert drift["speedup_prediction_error"] == pytest.approx(0.0)
    assert errors["quality_drop_prediction_error"] == pytest.approx(-0.002)
    assert errors["candidate"] == 7


def _measured(study, predicted_drop, drop, **metrics):
    recorded_trial(study, values=(0.9, 1.0, 1.0), metrics={
        "quality": 0.9, "quality_drop": drop, "predicted_quality_drop": predicted_drop,
        "latency_ms": 1.0, "size_mb": 1.0, **metrics})


def test_the_recovered_fraction_is_the_prior_until_candidates_are_measured():
    from paretoslim.search._picking import Picker
    from paretoslim.search._spec import CandidatesSpec, StudySpec

    spec = StudySpec(name="s", task="t.py:f",
                     candidates=CandidatesSpec(count=10, recovery=0.3))
    picker, study = Picker(spec, None, None), recorded_study()
    assert picker.recovered_fraction(study) == pytest.approx(0.3)
    _measured(study, 0.001, 0.0)  # too small a predicted drop to tell anything
    assert picker.recovered_fraction(study) == pytest.approx(0.3)
    for predicted, real in ((0.02, 0.01), (0.03, 0.012), (0.01, 0.008)):
        _measured(study, predicted, real)
    assert picker.recovered_fraction(study) == pytest.approx(0.5)  # median of .5, .6, .2
    from optuna.trial import TrialState

    for reason in ("quality drop 0.0136 above the limit 0.01 after its fine-tune",
                   "stopped at fine-tune step 75/300: quality 0.91 on the held-out slice"):
        recorded_trial(study, state=TrialState.PRUNED, stopped=reason, metrics={
            "quality_drop": 0.0136, "predicted_quality_drop": 0.02})
    # the gated one counts, the one stopped at a rung does not: median of .2, .32, .5, .6
    assert picker.recovered_fraction(study) == pytest.approx(0.41)
    for _ in range(5):
        _measured(study, 0.01, 0.03)
    assert picker.recovered_fraction(study) == 0.0  # a fine-tune that loses is clipped
    assert picker.recovered_fraction(study, promoted=True) == pytest.approx(0.7)  # the prior
    _measured(study, 0.04, 0.008, promoted="promoted at fine-tune step 150/300")
    assert picker.recovered_fraction(study, promoted=True) == pytest.approx(0.8)
    assert picker.recovered_fraction(study) == 0.0  # a promoted fine-tune is not counted


def test_a_candidate_only_a_promotion_brings_in_is_picked_while_the_study_may_promote():
    """A slice predicted too far down for the short fine-tune is measured when a promotion's
    recovery would bring it within the limit, at most ``stopping.promotions`` times."""
    from dataclasses import replace
    from types import SimpleNamespace

    from paretoslim.search._picking import Picker
    from paretoslim.search._record import FOR_PROMOTION
    from paretoslim.search._spec import CandidatesSpec, StoppingSpec, StudySpec

    def recipe(width):
        return Recipe(StudentConfig(width=width))

    candidates = recorded_study()
    for width, drop, ms, mb in ((0.5, 0.03, 1.0, 0.2), (0.75, 0.012, 4.0, 0.5),
                                (0.625, 0.06, 0.5, 0.1)):
        recorded_trial(candidates, recipe=recipe(width).to_dict(), values=(0.9, ms, mb),
                       metrics={"quality": 0.9, "quality_drop": drop, "speedup": 10 / ms,
                                "size_mb": mb})
    latency = {0.5: 1.0, 0.75: 4.0, 0.625: 0.5}
    scorer = SimpleNamespace(latency_ms=lambda r: latency[r.student.width], teacher_calls=(),
                             latency=SimpleNamespace(predict=lambda calls: 12.0))
    spec = StudySpec(name="s", task="t.py:f", stopping=StoppingSpec(
        promote_steps=5000, promotions=1), candidates=CandidatesSpec(
        count=3, finetune_steps=300, recovery=0.3, promoted_recovery=0.7))
    picker, study = Picker(spec, scorer, SimpleNamespace(size_mb=2.0)), recorded_study()
    # width 0.5: 0.03 kept to 0.021 by the short fine-tune, to 0.009 by a promotion;
    # width 0.625 (0.018 after a promotion) stays out
    chosen, prediction, number, drop, promotes = picker.pick(study, candidates)
    assert (chosen.student.width, number, promotes) == (0.5, 0, True)
    # figures of the latency model as refined since the screening: teacher 12 ms over 1 ms
    assert (prediction.latency_ms, prediction.speedup) == (1.0, pytest.approx(12.0))
    assert drop == pytest.approx(0.009)
    recorded_trial(study, recipe=recipe(0.875).to_dict(), prediction={FOR_PROMOTION: True})
    chosen, *_, promotes = picker.pick(study, candidates)  # the one promotion is spoken for
    assert (chosen.student.width, promotes) == (0.75, False)
    no_promotion = Picker(replace(spec, stopping=StoppingSpec(promote_steps=300)), scorer,
                          SimpleNamespace(size_mb=2.0))
    assert no_promotion.pick(recorded_study(), candidates)[0].student.width == 0.75


def test_measurements_are_learned_at_the_speed_of_the_first_teacher_timing(monkeypatch):
    """Each trial's latency is scaled by the teacher timed beside it, so a slower process
    does not teach the latency model a slower structure."""
    from types import SimpleNamespace

    from paretoslim.evaluators import LatencyModel
    from paretoslim.search import _candidates
    from paretoslim.search._candidates import CandidateTier

    monkeypatch.setattr(_candidates, "layer_calls", lambda *a: ("structure",))
    model = LatencyModel("key")
    monkeypatch.setattr(model, "save", lambda path: None)
    scorer = SimpleNamespace(latency=model, teacher_calls=("teacher",), example=None,
                             structure=lambda recipe: None, formats=lambda r, s: ({}, []))
    tier = CandidateTier.__new__(CandidateTier)
    tier.scorer, tier.reference_ms, tier.latency_path = scorer, None, None
    study = recorded_study()
    for teacher_ms, ms in ((20.0, 2.0), (25.0, 2.5)):  # the second process runs 25% slower
        recorded_trial(study, recipe=Recipe().to_dict(), values=(0.9, ms, 1.0), metrics={
            "quality": 0.9, "quality_drop": 0.0, "latency_ms": ms, "size_mb": 1.0,
            "baseline_latency_ms": teacher_ms})
        tier.learn(study, study.trials[-1])
    assert model.measurements == [(("teacher",), 20.0), (("structure",), 2.0),
                                  (("teacher",), 20.0), (("structure",), 2.0)]


def test_a_sampler_that_repeats_itself_does_not_end_the_screening(tmp_path, monkeypatch):
    """When the sampler proposes only recipes already scored, random unscored ones are
    drawn: the screening reaches its count."""
    from types import SimpleNamespace

    import optuna

    from paretoslim.search import _candidates, parse_spec
    from paretoslim.search._candidates import CandidateTier, candidate_study
    from paretoslim.search._progress import StudyProgress
    from paretoslim.search._proxy import Prediction

    class Stuck(optuna.samplers.RandomSampler):
        def sample_independent(self, study, trial, name, distribution):
            return distribution.to_external_repr(0) if hasattr(distribution, "choices") \
                else distribution.low

    monkeypatch.setattr(_candidates, "make_sampler", lambda spec, population: Stuck())
    spec = parse_spec({"task": "t.py:f", "name": "s", "candidates": {"count": 8},
                       "space": {"student": {"width": [0.5, 0.75, 1.0]},
                                 "pruning": {"ratio": [0.0, 0.2, 0.4]}}}, tmp_path / "s.toml")
    tier = CandidateTier.__new__(CandidateTier)
    tier.spec, tier.elastic_path = spec, tmp_path / "elastic.pt"
    tier.progress = StudyProgress(target=1, completed=0, enabled=False)
    tier.scorer = SimpleNamespace(drops={}, score=lambda recipe: Prediction(
        0.9, 0.0, 1.0, 2.0, 1.0, 0.0))
    study = recorded_study(name="s")
    assert tier.screen(study, None) == 8
    scored = StudyStore(candidate_study(study, spec)).completed_records()
    assert len({json.dumps(r.recipe, sort_keys=True) for r in scored}) == 8


def test_all_trials_lists_the_predicted_tier_apart():
    from paretoslim.search._front import render_front

    study = recorded_study()
    recorded_trial(study, metrics={"quality": 0.9, "quality_drop": 0.0, "latency_ms": 1.0,
                                   "speedup": 2.0, "size_mb": 1.0, "compression": 2.0},
                   values=(0.9, 1.0, 1.0))
    candidates = recorded_study(name="x.candidates")
    recorded_trial(candidates, metrics={"tier": "predicted", "quality": 0.95,
                                        "quality_drop": 0.0, "latency_ms": 0.1,
                                        "size_mb": 0.1}, values=(0.95, 0.1, 0.1))
    rows = json.loads(render_front(study, "json", all_trials=True, candidates=candidates))
    assert [(r["tier"], r["state"]) for r in rows] == [("measured", "complete"),
                                                      ("predicted", "predicted")]
    front = json.loads(render_front(study, "json"))
    assert [p["number"] for p in front] == [0]  # a prediction is never on the front


def test_a_two_tier_study_measures_only_candidates_it_predicted(in_tmp, monkeypatch):
    """With the predicted tier on, candidates are scored and recorded apart, the measured
    trials are candidates (no seed recipe), each records its prediction and its error, and
    the elastic student and latency model are cached for the next study."""
    from _tiny import write_study
    from optuna.trial import TrialState

    from paretoslim.search import load_spec, run_study
    from paretoslim.search._candidates import candidate_study
    from paretoslim.search._store import StudyStore

    monkeypatch.setenv("PARETOSLIM_CACHE", str(in_tmp / "cache"))
    path = write_study(in_tmp, trials=2)
    path.write_text(path.read_text() + "[candidates]\ncount = 10\nelastic_steps = 5\n"
                    "population = 4\nrecovery = 0.5\n")
    spec = load_spec(path)
    study = run_study(spec, progress=False)
    predicted = StudyStore(candidate_study(study, spec)).completed_records()
    assert 1 <= len(predicted) <= 10
    assert all(r.metrics["tier"] == "predicted" and r.metrics["latency_ms"] > 0
               for r in predicted)
    measured = StudyStore(study).completed_records()
    assert measured
    known = {json.dumps(r.recipe, sort_keys=True) for r in predicted}
    for record in measured:
        assert json.dumps(record.recipe, sort_keys=True) in known
        assert "latency_prediction_error" in record.metrics
        assert record.metrics["predicted_latency_ms"] > 0
    assert not study.get_trials(states=(TrialState.WAITING,))
    cache = in_tmp / "cache"
    assert list((cache / "elastic").glob("*.pt")) and list((cache / "latency").glob("*.json"))
    drops = json.loads(next((cache / "elastic").glob("*.drops.json")).read_text())
    assert len(drops) >= len(predicted)  # kept for the next study of this teacher


def test_the_teachers_own_structure_starts_from_the_teacher(cnn):
    """A candidate whose structure is the teacher's is scored and measured from the teacher
    itself (no fine-tune), not from the elastic student's full-width slice."""
    from types import SimpleNamespace

    from paretoslim.search._candidates import CandidateTier
    from paretoslim.search._proxy import CandidateScorer

    teacher = cnn.model
    narrow = compress(teacher, Recipe.from_dict({"student": {"width": 0.5}}),
                      example_input=cnn.example_input, train=cnn.train, calibration=None,
                      finetune_steps=0, learning_rate=1e-3, seed=0)[0]
    scorer = SimpleNamespace(task=SimpleNamespace(model=teacher))
    assert CandidateScorer.is_teacher(scorer, copy.deepcopy(teacher))
    assert not CandidateScorer.is_teacher(scorer, narrow)
    tier = CandidateTier.__new__(CandidateTier)
    tier.active = True
    for structure, starts in ((copy.deepcopy(teacher), False), (narrow, True)):
        tier.scorer = SimpleNamespace(structure=lambda recipe, s=structure: s,
                                      is_teacher=lambda m: CandidateScorer.is_teacher(scorer, m))
        assert (tier.start(Recipe()) is not None) == starts


def test_a_trial_picked_for_a_promotion_is_told_so_by_its_guide():
    from paretoslim.search import parse_spec
    from paretoslim.search._guide import guide_for
    from paretoslim.search._loop import TrialFlow, run_one
    from paretoslim.search._record import FOR_PROMOTION, TrialResult
    from paretoslim.search._sampling import suggest_recipe
    from paretoslim.search._tally import RunTally

    spec = parse_spec({"task": "t.py:f", "name": "s", "candidates": {"count": 3},
                       "space": {"student": {"width": [0.5, 0.75]}}})
    flow, study, told = TrialFlow(spec, RunTally(target=2, budget_s=None), None), \
        recorded_study(), []

    def run(recipe, data):
        told.append(guide_for(spec, data).for_promotion)
        return TrialResult(recipe, stopped="stopped at fine-tune step 1/2")

    for promotes, width in ((True, 0.5), (False, 0.75)):
        params = spec.space.params(Recipe(StudentConfig(width=width)))
        StudyStore.enqueue_predicted(study, params, {"candidate": 0, FOR_PROMOTION: promotes})
        trial = study.ask()
        run_one(flow, trial, suggest_recipe(trial, spec), run)
    assert told == [True, False]
    assert StudyStore.record(study.trials[0]).metrics[FOR_PROMOTION] is True


def test_every_structure_of_the_space_is_micro_timed_before_scoring(tmp_path, monkeypatch):
    """No candidate's latency rests on the per-kind fit alone: the layers of every structure
    under every scheme (and in float, for the layers kept float) are timed up front."""
    from types import SimpleNamespace

    from paretoslim.evaluators import LatencyModel
    from paretoslim.search import _candidates, parse_spec
    from paretoslim.search._candidates import CandidateTier
    from paretoslim.search._progress import StudyProgress

    spec = parse_spec({"task": "t.py:f", "name": "s", "candidates": {"count": 8},
                       "space": {"student": {"width": [0.5, 0.75, 1.0]},
                                 "pruning": {"ratio": [0.0, 0.2, 0.4]},
                                 "quantization": {"scheme": ["bf16", "int8_static"]}}},
                      tmp_path / "s.toml")
    timed = []
    monkeypatch.setattr(_candidates, "layer_calls", lambda structure, x, formats: [
        LayerCall("linear", (1, structure), (1, structure), format=f) for f in formats])
    monkeypatch.setattr(_candidates, "time_layer_calls",
                        lambda calls, threads: timed.extend(calls) or dict.fromkeys(calls, 1.0))
    model = LatencyModel("key")
    monkeypatch.setattr(model, "save", lambda path: None)
    scheme_format = {"fp32": "fp32", "bf16": "bf16", "int8_static": "int8"}
    tier = CandidateTier.__new__(CandidateTier)
    tier.spec, tier.latency_path = spec, None
    tier.progress = StudyProgress(target=1, completed=0, enabled=False)
    tier.scorer = SimpleNamespace(
        latency=model, teacher_calls=(), example=None,
        structure=lambda r: round(100 * r.student.width * (1 - r.pruning.ratio)),
        formats=lambda r, s: ({scheme_format[r.quantization.scheme]: None}, []))
    tier._calibrate_latency()
    widths = {round(100 * w * (1 - p)) for w in (0.5, 0.75, 1.0) for p in (0.0, 0.2, 0.4)}
    assert {(c.input_shape[1], c.format) for c in timed} == {
        (n, f) for n in widths for f in ("fp32", "bf16", "int8")}
    assert len(timed) == len(set(timed))  # each distinct layer once
