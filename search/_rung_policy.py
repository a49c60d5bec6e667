"""The rung policy of one trial: what it does at each rung of its fine-tune (record the slice
quality, promote a near miss, stop a hopeless one, successive halving) and at its end (the
quality gate). It answers the fine-tune's watch (``spaces.FineTuneWatch``)."""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from itertools import pairwise
from typing import Any

from torch import nn

from ..evaluators import ComputeShare
from ..spaces import Verdict
from ._guide import Guide
from ._measuring import Baseline, quality_drop, quality_of, val_slice
from ._record import rungs_text
from ._stopping import Rung, RungPoint, halving_reason, promotion_reason, stop_reason
from ._task import Task
from ._timing import StructureTimer

PACE_STEPS = 100  # the last fine-tune steps whose median time projects a promotion's


class TrialStopped(Exception):
    """A trial stopped on purpose (at a rung, by the quality gate, or dominated before its
    fine-tune); its message is the reason."""


class RungPolicy:
    """The fine-tune's watch for one trial; ``partial`` collects the figures a stop keeps.

    ``watching``: the rungs are watched (else only each step is followed: ``on_step(done,
    total)`` and the compute share's pause point). The structure's latency and size come
    from ``timer`` (its kept structure) once a rung needs them. With ``trained_start`` (a
    fine-tune from a trained slice, whose first steps may dip below its start), the
    quality at step 0 is recorded but not projected from.
    """

    def __init__(self, task: Task, baseline: Baseline, guide: Guide, timer: StructureTimer,
                 share: ComputeShare, stage: Callable[[str], None],
                 on_step: Callable[[int, int], None]):
        self.task, self.baseline, self.guide, self.timer = task, baseline, guide, timer
        self.share, self.stage, self.on_step = share, stage, on_step
        self.partial: dict[str, Any] = {}
        self.curve: list[Rung] = []
        self.watching = False
        self.trained_start = False
        self.finetune_started = 0.0
        self.step_ends: deque = deque(maxlen=PACE_STEPS + 1)

    @property
    def rungs(self) -> tuple[float, ...]:
        return tuple(self.guide.stopping.rungs) if self.watching else ()

    def watches(self) -> bool:
        """Whether the guide's stopping rule watches the rungs."""
        stopping = self.guide.stopping
        return stopping is not None and stopping.enabled

    def after_step(self, done: int, total: int) -> None:
        self.step_ends.append(time.perf_counter())
        self.on_step(done, total)
        self.share.pause_point()

    def at_rung(self, step: int, steps: int, model: nn.Module) -> Verdict:
        """Record the slice quality at a rung; the Verdict extends a near miss's fine-tune
        (a promotion) or stops a curve that cannot reach the limit."""
        if not self.watching:
            return Verdict()
        stopping = self.guide.stopping
        if step == 0:
            self.finetune_started = time.perf_counter()
            self.step_ends.clear()
        quality = quality_of(self.task, model, val_slice(self.task, stopping.slice_samples))
        self.curve.append(Rung(step, steps, quality))
        self.partial["rungs"] = rungs_text([(r.step, r.quality) for r in self.curve])
        limit = (self.baseline.slice_quality(self.task, stopping.slice_samples)
                 - self.guide.max_quality_drop)
        promoted = self._promotion(step, steps, limit)
        if promoted is not None:
            return Verdict(extend_to=promoted)
        reason = (stop_reason(self.projected_curve, limit, stopping.slack)
                  or self._halving(step, steps))
        if reason is not None:
            return Verdict(stop=reason)
        return Verdict()

    @property
    def projected_curve(self) -> list[Rung]:
        """The rungs a projection reads (without step 0 after a trained start)."""
        if self.trained_start:
            return [r for r in self.curve if r.step > 0]
        return self.curve

    def gate(self, quality: float) -> None:
        """Raise TrialStopped when the quality after the fine-tune is above the limit."""
        if not self.watches() or self.guide.stopping.time_infeasible:
            return
        drop = quality_drop(self.baseline.quality, quality)
        if drop > self.guide.max_quality_drop:
            raise TrialStopped(f"quality drop {drop:.4f} above the limit "
                               f"{self.guide.max_quality_drop:g} after its fine-tune")

    def _halving(self, step: int, steps: int) -> str | None:
        """Why successive halving stops the trial at this rung, or None; the structure's
        latency and size are recorded for the ranking of later trials."""
        eta = self.guide.stopping.halving
        if eta < 2 or step == 0 or step >= steps or self.timer.structure is None:
            return None
        latency, size = self.timer.structure_latency(), self.timer.structure_size()
        self.partial.update(latency, size_mb=size)
        point = RungPoint(step / steps, self.curve[-1].quality, latency["latency_ms"], size)
        return halving_reason(point, self.guide.rung_points, eta)

    def _promotion(self, step: int, steps: int, limit: float) -> int | None:
        """The longer fine-tune of a trial at its last rung projected near the quality limit
        (even one the stopping rule would end) whose structure would extend the feasible
        front; None to keep its steps."""
        stopping = self.guide.stopping
        last = max(1, round(stopping.rungs[-1] * steps)) if stopping.rungs else 0
        if (step != last or stopping.promote_steps <= steps or self.guide.promotions_left < 1
                or self.timer.structure is None or not self._fits(step, stopping.promote_steps)):
            return None
        reason = promotion_reason(self.projected_curve, limit, stopping.promote_margin,
                                  wanted=self.guide.for_promotion)
        if reason is None:
            return None
        size, latency = self.timer.structure_size(), self.timer.structure_latency()
        if not self.guide.extends_front(latency["latency_ms"], size):
            return None
        self.partial.update(latency, promoted=reason)  # kept should the trial stop
        self.stage(f"promoted to {stopping.promote_steps} steps")
        return stopping.promote_steps

    def _fits(self, step: int, steps: int) -> bool:
        """Whether fine-tuning on to ``steps`` ends within the budget, at the median pace of
        the last steps (a step that waited for a timing, or ran beside a compilation, is
        not the pace ahead), else at the pace so far."""
        ends = list(self.step_ends)
        if len(ends) > PACE_STEPS // 2:
            pace = statistics.median(b - a for a, b in pairwise(ends))
        else:
            pace = (time.perf_counter() - self.finetune_started) / max(1, step)
        return time.time() + pace * (steps - step) <= self.guide.ends_at
