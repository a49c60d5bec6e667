"""Which candidate the measured tier runs next: the one predicted to add most hypervolume
to the measured front, among those predicted feasible once the fine-tune's recovery is
counted (a promoted fine-tune's, while the study may promote), never a recipe taken or a
structure stopped at a rung."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.trial import TrialState

from ..spaces import Recipe
from ._candidate_plan import structure_key
from ._measuring import Baseline
from ._proxy import CandidateScorer, Prediction
from ._record import FOR_PROMOTION, TrialRecord
from ._report_data import hypervolume
from ._spec import StudySpec
from ._stopping import RUNG_STOP
from ._store import StudyStore

MIN_DROP = 0.002  # a predicted drop below this tells nothing of the fine-tune's recovery


@dataclass
class Picker:
    """Chooses the next candidate of ``spec``'s study to measure (see the module)."""

    spec: StudySpec
    scorer: CandidateScorer
    baseline: Baseline

    def pick(self, study: optuna.Study, candidates: optuna.Study
             ) -> tuple[Recipe, Prediction, int, float, bool] | None:
        """The feasible-looking candidate of ``candidates`` not yet in ``study`` that adds
        most predicted hypervolume to the measured front: its recipe, prediction, number,
        the drop expected after its fine-tune and whether only a promotion brings it there.
        None when none adds any."""
        taken, stopped = self.taken(study), self.stopped_structures(study)
        kept = 1.0 - self.recovered_fraction(study)
        kept_promoted = (1.0 - self.recovered_fraction(study, promoted=True)
                         if self.may_promote(study) else None)
        limit = self.spec.constraints.max_quality_drop + self.spec.candidates.margin
        pool = []
        for t in candidates.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            record = StudyStore.record(t)
            recipe = record.parsed_recipe()
            if (record.duplicate_of is not None or recipe is None
                    or recipe in taken or structure_key(recipe) in stopped):
                continue
            predicted = record.metrics["quality_drop"]
            if predicted * kept <= limit:
                pool.append((recipe, t.number, predicted * kept, False, record.metrics))
            elif kept_promoted is not None and predicted * kept_promoted <= limit:
                pool.append((recipe, t.number, predicted * kept_promoted, True, record.metrics))
        if not pool:
            return None
        front = self.measured_losses(study)
        reference = self.reference(limit)
        base = hypervolume(front, reference) if len(front) else 0.0
        best = None
        teacher_ms = self.scorer.latency.predict(self.scorer.teacher_calls)
        for recipe, number, drop, promotes, metrics in pool:
            latency = self.scorer.latency_ms(recipe)  # by the model as refined so far
            prediction = Prediction(metrics["quality"], metrics["quality_drop"], latency,
                                    teacher_ms / latency, metrics["size_mb"], 0.0)
            loss = [max(drop, 0.0), math.log(latency), math.log(prediction.size_mb)]
            gain = hypervolume(np.vstack([front, [loss]]) if len(front) else [loss],
                               reference) - base
            if best is None or gain > best[0]:
                best = (gain, recipe, prediction, number, drop, promotes)
        if best is None or best[0] <= 0:
            return None
        return best[1:]

    def may_promote(self, study: optuna.Study) -> bool:
        """Whether a candidate may be picked for a promotion: the study promotes fine-tunes
        past the candidates' steps, and fewer than ``stopping.promotions`` candidates were
        picked for one (promoted or not, so that a promotion the rungs refuse is not
        retried)."""
        stopping = self.spec.stopping
        steps = self.spec.candidates.finetune_steps or self.spec.finetune.steps
        if stopping.promotions < 1 or stopping.promote_steps <= steps:
            return False
        picked = sum(1 for t in study.get_trials(deepcopy=False)
                     if (StudyStore.record(t).prediction or {}).get(FOR_PROMOTION))
        return picked < stopping.promotions

    def stopped_structures(self, study: optuna.Study) -> set[str]:
        """Structures whose fine-tune was stopped at a rung: the float fine-tune is the
        same under every post-training scheme, so it would stop again."""
        return {structure_key(r.parsed_recipe()) for _, r in StudyStore(study).trials(
            TrialState.PRUNED) if r.parsed_recipe() is not None and r.stopped
            and r.stopped.startswith(RUNG_STOP)
            and not r.parsed_recipe().quantization.qat}

    def taken(self, study: optuna.Study) -> set[Recipe]:
        """The recipes ``study`` ran, runs or holds enqueued."""
        recipes = set()
        for t in study.get_trials(deepcopy=False):
            if t.state == TrialState.WAITING:
                try:
                    recipe = self.spec.space.recipe(t.system_attrs.get("fixed_params", {}))
                except (KeyError, TypeError, ValueError):
                    continue
            else:
                recipe = StudyStore.record(t).parsed_recipe()
            if recipe is not None:
                recipes.add(recipe)
        return recipes

    def reference(self, limit: float) -> list[float]:
        """The hypervolume's worst corner, in (drop, log ms, log MB): twice the quality
        limit, the teacher's latency and size (5% beyond). A predicted drop errs by about
        half a limit, so a candidate near the limit still counts (from the limit itself,
        the most compressed points would weigh next to nothing beside one that keeps the
        teacher's quality)."""
        teacher_ms = self.scorer.latency.predict(self.scorer.teacher_calls)
        return [2 * limit + 1e-6, math.log(teacher_ms * 1.05),
                math.log(self.baseline.size_mb * 1.05)]

    def measured_losses(self, study: optuna.Study) -> np.ndarray:
        """The feasible measured points as (drop, log ms, log MB) rows, each latency put on
        the latency model's scale through its measured speedup over the teacher timed beside
        it (timings of different processes differ by the machine's drift)."""
        limit = self.spec.constraints.max_quality_drop
        teacher_ms = self.scorer.latency.predict(self.scorer.teacher_calls)
        rows = []
        for record in StudyStore(study).completed_records():
            m = record.metrics
            if m.get("quality_drop", 1.0) <= limit:
                ms = teacher_ms / m["speedup"] if m.get("speedup") else m["latency_ms"]
                rows.append([m["quality_drop"], math.log(ms), math.log(m["size_mb"])])
        return np.array(rows).reshape(-1, 3)

    @staticmethod
    def fine_tuned(study: optuna.Study) -> list[TrialRecord]:
        """The records of the trials whose fine-tune ran to its end: completed, or stopped
        after it by the quality limit (not at a rung, where quality is not final)."""
        return [r for t, r in StudyStore(study).trials(TrialState.COMPLETE, TrialState.PRUNED)
                if r.duplicate_of is None and "quality_drop" in r.metrics
                and (t.state == TrialState.COMPLETE
                     or not (r.stopped or "").startswith(RUNG_STOP))]

    def recovered_fraction(self, study: optuna.Study, promoted: bool = False) -> float:
        """The fraction of a slice's predicted quality drop the fine-tune recovers (with
        ``promoted``, a promoted one): the median over the fine-tuned candidates of
        ``1 - measured / predicted drop`` (those predicted to lose at least ``MIN_DROP``),
        clipped to [0, 1]; before any was measured, the spec's prior
        ``candidates.recovery`` (``candidates.promoted_recovery``)."""
        fractions = [1.0 - r.metrics["quality_drop"] / r.metrics["predicted_quality_drop"]
                     for r in self.fine_tuned(study) if r.promoted == promoted
                     and r.metrics.get("predicted_quality_drop", 0.0) >= MIN_DROP]
        if not fractions:
            c = self.spec.candidates
            return c.promoted_recovery if promoted else c.recovery
        return min(1.0, max(0.0, statistics.median(fractions)))
