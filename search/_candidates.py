"""The predicted tier of a study: hundreds of candidates of the space scored by the proxies
(``_proxy``) and recorded in the study's candidate study (``NAME.candidates``, in the same
storage); the measured tier runs, one at a time, the candidate that would add most to the
measured front, and every measured point teaches the proxies their error."""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from functools import partial

import optuna
from optuna.trial import TrialState
from torch import nn

from ..evaluators import (
    OTHER,
    LatencyModel,
    cache_dir,
    layer_calls,
    save_json,
    target_key,
    time_layer_calls,
)
from ..kernels import detect_target
from ..spaces import ElasticStudent, Recipe, model_io
from ._candidate_plan import structural_recipes, structure_key, timed_recipes
from ._measuring import Baseline, latency_input
from ._picking import Picker
from ._private import storage_of_study
from ._progress import StudyProgress
from ._proxy import CandidateScorer, Prediction, unpredicted
from ._record import FOR_PROMOTION, TrialRecord, TrialResult
from ._sampling import enqueue_seeds, make_sampler, suggest_recipe, untried_params
from ._spec import StudySpec
from ._store import StudyStore
from ._study import CANDIDATES_SUFFIX
from ._task import Task
from ._trial import TrialSettings

REPEATS_IN_A_ROW = 60  # proposals in a row of scored recipes: the space is exhausted
REPEATS_BEFORE_A_DRAW = 5  # repeats in a row after which a random unscored recipe is next


def candidate_study(study: optuna.Study, spec: StudySpec) -> optuna.Study:
    """The candidate study beside ``study`` (created when missing)."""
    return optuna.create_study(
        study_name=study.study_name + CANDIDATES_SUFFIX, storage=storage_of_study(study),
        directions=spec.directions, load_if_exists=True,
        sampler=make_sampler(spec, population=spec.candidates.population))


class CandidateTier:
    """Builds the proxies of ``spec``'s study (elastic student and latency model, cached per
    teacher and per target), scores candidates and picks the ones worth measuring."""

    def __init__(self, spec: StudySpec, task: Task, baseline: Baseline,
                 progress: StudyProgress):
        self.spec, self.task, self.baseline, self.progress = spec, task, baseline, progress
        self.scorer: CandidateScorer | None = None
        self.elastic_path = None
        self.active = True
        self.reference_ms: float | None = None  # the teacher's time the model learns at

    # --- the run ------------------------------------------------------------------------

    def begin(self, study: optuna.Study, ends_at: float | None) -> bool:
        """Build the proxies, score the candidates and enqueue the first one to measure;
        False when none is worth measuring (the run ends). A space none of whose
        candidates can be predicted runs as without the tier (seed recipes, then the
        sampler)."""
        self.prepare(ends_at)
        count = self.screen(study, ends_at)
        predicted = len(StudyStore(candidate_study(study, self.spec)).completed_records())
        self.progress.note(f"candidates: {count} distinct scored, {predicted} predicted")
        if not predicted:
            self.active = False
            enqueue_seeds(study, self.spec)
            return True
        return self._next(study)

    def after(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        """Learn from a finished measured trial and enqueue the next candidate; False when
        none is left worth measuring."""
        if not self.active:
            return True
        self.learn(study, trial)
        if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return True
        return self._next(study)

    def _next(self, study: optuna.Study) -> bool:
        if self.enqueue_next(study):
            return True
        self.progress.note("no candidate left that the proxies predict would extend the "
                           "measured front")
        return False

    def settings(self, settings: TrialSettings) -> TrialSettings:
        """The settings of a trial that fine-tunes from its slice
        (``candidates.learning_rate`` and ``candidates.finetune_steps``)."""
        c = self.spec.candidates
        finetune = dataclasses.replace(settings.finetune, learning_rate=c.learning_rate,
                                       steps=c.finetune_steps or settings.finetune.steps)
        return dataclasses.replace(settings, finetune=finetune)

    def start(self, recipe: Recipe) -> nn.Module | None:
        """A copy of the recalibrated slice of ``recipe``'s structure to fine-tune from
        (None: derive it from the teacher, as for the teacher's own structure, which needs
        no fine-tune)."""
        if not self.active or self.scorer is None or unpredicted(recipe) is not None:
            return None
        structure = self.scorer.structure(recipe)
        return None if self.scorer.is_teacher(structure) else copy.deepcopy(structure)

    # --- the proxies --------------------------------------------------------------------

    def prepare(self, ends_at: float | None) -> None:
        """Load or build the elastic student and the latency model."""
        self._build_scorer(self._elastic(ends_at))

    def prepare_latency(self) -> LatencyModel:
        """Load the latency model and time every layer the space's structures call
        that it has not timed (``paretoslim bench latency``): the slices' shapes come from
        the cached elastic student, else from an untrained one (the same shapes)."""
        path = self._elastic_path()
        elastic = (ElasticStudent.load(path, self.task.model, self.task.example_input)
                   if path.exists() else ElasticStudent(self.task.model, self.task.example_input))
        self._build_scorer(elastic)
        return self.scorer.latency

    def _build_scorer(self, elastic: ElasticStudent) -> None:
        latency = self._latency_model()
        drops = {}
        if self.drops_path.exists():
            try:
                drops = json.loads(self.drops_path.read_text())
            except (OSError, ValueError):
                drops = {}  # a damaged cache is rebuilt
        self.scorer = CandidateScorer(self.task, self.spec, self.baseline, elastic, latency,
                                      drops)
        self._calibrate_latency()

    @property
    def drops_path(self):
        """Where the predicted quality drops of the elastic student's candidates are kept:
        a later study of the same teacher (another batch, another target) reuses them."""
        return self.elastic_path.with_name(self.elastic_path.stem + ".drops.json")

    def _elastic_path(self):
        """Where the elastic student of this teacher, space and training is cached."""
        c, structures = self.spec.candidates, structural_recipes(self.spec.space)
        key = ElasticStudent.cache_key(
            self.task.model, structures=[structure_key(r) for r in structures],
            steps=c.elastic_steps, learning_rate=c.elastic_learning_rate,
            distillation=repr(structures[0].distillation), seed=self.spec.seed)
        self.elastic_path = cache_dir() / "elastic" / f"{key}.pt"
        return self.elastic_path

    def _elastic(self, ends_at: float | None) -> ElasticStudent:
        c, teacher = self.spec.candidates, self.task.model
        structures = structural_recipes(self.spec.space)
        path = self._elastic_path()
        if path.exists():
            self.progress.note(f"elastic student: loaded from cache {path}")
            return ElasticStudent.load(path, teacher, self.task.example_input)
        self.progress.current = "elastic student"
        self.progress.stage("")
        started = time.perf_counter()
        elastic = ElasticStudent(teacher, self.task.example_input)
        elastic.train(structures, self.task.train, c.elastic_steps,
                      distillation=structures[0].distillation,
                      learning_rate=c.elastic_learning_rate, seed=self.spec.seed,
                      on_step=partial(self.progress.fine_tune_step, unit="sandwich step"))
        self.progress.current = ""
        path.parent.mkdir(parents=True, exist_ok=True)
        elastic.save(path)
        self.progress.note(f"elastic student: trained {c.elastic_steps} sandwich steps in "
                           f"{time.perf_counter() - started:.0f} s, cached at {path}")
        return elastic

    def _latency_model(self) -> LatencyModel:
        latency = self.spec.latency
        key = target_key(detect_target(latency.target), threads=latency.threads,
                         batch=self.scorer_batch(), lowering=latency.lowering)
        self.latency_path = LatencyModel.path(cache_dir(), key)
        if self.latency_path.exists():
            model = LatencyModel.load(self.latency_path)
            self.progress.note(f"latency model: loaded from cache ({len(model.table)} layers "
                               f"timed, {len(model.distinct())} structures measured in full)")
            return model
        return LatencyModel(key)

    def scorer_batch(self) -> int:
        return model_io.batch_size(latency_input(self.task, self.spec.latency))

    def _calibrate_latency(self) -> None:
        """Micro-time the layers of every structure of the space under each of its schemes
        that the latency model has not timed (each distinct layer once)."""
        scorer = self.scorer
        calls = set(scorer.teacher_calls)
        structures: dict[str, nn.Module] = {}
        for recipe in timed_recipes(self.spec.space):
            key = structure_key(recipe)
            if key not in structures:
                structures[key] = scorer.structure(recipe)
            structure = structures[key]
            formats, _ = scorer.formats(recipe, structure)
            calls.update(layer_calls(structure, scorer.example, formats))
        missing = [c for c in calls if c.kind != OTHER and c not in scorer.latency.table]
        if missing:
            self.progress.stage(f"timing {len(missing)} layers")
            started = time.perf_counter()
            scorer.latency.add_timings(time_layer_calls(missing, self.spec.latency.threads))
            scorer.latency.save(self.latency_path)
            self.progress.note(f"latency model: {len(missing)} layers timed in "
                               f"{time.perf_counter() - started:.0f} s")

    # --- scoring ------------------------------------------------------------------------

    def screen(self, study: optuna.Study, ends_at: float | None) -> int:
        """Score candidates proposed by the spec's sampler until the candidate study holds
        ``candidates.count`` distinct ones, the space is exhausted or ``ends_at``; return
        how many it holds."""
        candidates = candidate_study(study, self.spec)
        scored = {}
        for t in candidates.get_trials(deepcopy=False,
                                       states=(TrialState.COMPLETE, TrialState.FAIL)):
            record = StudyStore.record(t)
            if record.duplicate_of is None and record.parsed_recipe() is not None:
                scored[record.parsed_recipe()] = t
        target, repeats = self.spec.candidates.count, 0
        rng = random.Random(f"{self.spec.seed}:{len(scored)}")
        bar = self.progress.counter("candidates scored", target, len(scored))
        try:
            while len(scored) < target and repeats < REPEATS_IN_A_ROW:
                if ends_at is not None and time.time() >= ends_at:
                    break
                trial = candidates.ask()
                recipe = suggest_recipe(trial, self.spec)
                if recipe in scored:
                    repeats += 1
                    _tell_repeat(candidates, trial, recipe, scored[recipe])
                    if repeats % REPEATS_BEFORE_A_DRAW == 0:  # the sampler has converged
                        params = untried_params(self.spec, scored, rng)
                        if params is None:
                            break  # the space is, as far as draws tell, exhausted
                        candidates.enqueue_trial(params)
                    continue
                repeats = 0
                self._score_one(candidates, trial, recipe)
                scored[recipe] = candidates.get_trials(deepcopy=False)[trial.number]
                bar.update(1)
        finally:
            bar.close(len(scored))
            save_json(self.drops_path, self.scorer.drops)
        return len(scored)

    def _score_one(self, candidates: optuna.Study, trial: optuna.Trial, recipe: Recipe) -> None:
        StudyStore.begin(trial, recipe.to_dict())
        try:
            prediction = self.scorer.score(recipe)
        except ValueError as exc:
            StudyStore.write_result(trial, self.spec, TrialResult(
                recipe, failure=f"not predicted: {exc}"))
            candidates.tell(trial, state=TrialState.FAIL)
            return
        values = StudyStore.write_result(trial, self.spec, TrialResult(
            recipe, values=_values(prediction), metrics=prediction.metrics()))
        candidates.tell(trial, values)

    # --- the measured tier --------------------------------------------------------------

    def enqueue_next(self, study: optuna.Study) -> bool:
        """Enqueue in ``study`` the feasible-looking candidate not yet measured that adds
        most predicted hypervolume to the measured front; False when none adds any."""
        pick = Picker(self.spec, self.scorer, self.baseline).pick(
            study, candidate_study(study, self.spec))
        if pick is None:
            return False
        recipe, prediction, number, expected_drop, promotes = pick
        StudyStore.enqueue_predicted(study, self.spec.space.params(recipe), {
            "candidate": number, "predicted_quality": prediction.quality,
            "predicted_quality_drop": prediction.quality_drop,
            "predicted_finetuned_quality_drop": expected_drop,
            "predicted_latency_ms": prediction.latency_ms,
            "predicted_size_mb": prediction.size_mb, "predicted_speedup": prediction.speedup,
            FOR_PROMOTION: promotes})
        return True

    def learn(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Teach the latency model the measured latency of a completed trial and of the
        teacher timed beside it, both scaled to the machine's speed when the first was
        timed (the teacher's time drifts about 20% between processes)."""
        record = StudyStore.record(trial)
        recipe = record.parsed_recipe()
        if not record.complete or recipe is None or self.scorer is None:
            return
        try:
            structure = self.scorer.structure(recipe)
        except ValueError:
            return
        formats, _ = self.scorer.formats(recipe, structure)
        baseline_ms = record.metrics.get("baseline_latency_ms")
        scale = 1.0
        if baseline_ms:
            self.reference_ms = self.reference_ms or baseline_ms
            scale = self.reference_ms / baseline_ms
            self.scorer.latency.add_measurement(self.scorer.teacher_calls, self.reference_ms)
        self.scorer.latency.add_measurement(layer_calls(structure, self.scorer.example, formats),
                                            record.metrics["latency_ms"] * scale)
        self.scorer.latency.save(self.latency_path)


def _values(p: Prediction) -> dict[str, float]:
    return {"quality": p.quality, "latency_ms": p.latency_ms, "size_mb": p.size_mb}


def _tell_repeat(candidates: optuna.Study, trial: optuna.Trial, recipe: Recipe,
                 earlier: optuna.trial.FrozenTrial) -> None:
    """Tell the sampler a proposal it made before what it got then (a repeat is recorded
    as one, and counted once)."""
    StudyStore.write(trial, TrialRecord(recipe=recipe.to_dict(), duplicate_of=earlier.number,
                                        metrics=StudyStore.record(earlier).metrics or None))
    if earlier.state == TrialState.COMPLETE:
        for name, value in earlier.constraints.items():
            trial.set_constraint(name, value)
        candidates.tell(trial, earlier.values)
    else:
        candidates.tell(trial, state=TrialState.FAIL)

