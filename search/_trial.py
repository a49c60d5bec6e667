"""One trial: compress the teacher by a recipe, lower it, measure it; a pipeline of stages.

The trial compresses the structure first when that saves work (``_timing``: timed once,
while the fine-tune runs), fine-tunes it under the rung policy (``_rung_policy``, the
fine-tune's watch), gates on quality, then times the final model. Imports no backend."""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..evaluators import ComputeShare, size_mb, torch_threads
from ..kernels import detect_target
from ..spaces import Deadline, Recipe, compress
from ._guide import Guide
from ._measuring import (
    Baseline,
    Measure,
    calibration_batches,
    one_line,
    quality_drop,
    quality_of,
)
from ._record import TrialResult
from ._rung_policy import RungPolicy, TrialStopped
from ._spec import FinetuneSpec, LatencySpec, StudySpec
from ._task import Task
from ._timing import StructureTimer


@dataclass(frozen=True)
class TrialSettings:
    """Everything about a trial that is not the recipe: the spec's fine-tune and latency
    sections and its seed."""

    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    latency: LatencySpec = field(default_factory=LatencySpec)
    seed: int = 0

    @classmethod
    def from_spec(cls, spec: StudySpec) -> TrialSettings:
        return cls(spec.finetune, spec.latency, spec.seed)


def run_trial(task: Task, recipe: Recipe, settings: TrialSettings, baseline: Baseline,
              on_stage: Callable[[str], None] | None = None,
              measure: Measure | None = None, guide: Guide | None = None,
              on_step: Callable[[int, int], None] | None = None,
              start: nn.Module | None = None) -> TrialResult:
    """Compress, lower and measure one recipe; never raises for a failing recipe.

    The result's ``values`` hold ``quality``, ``latency_ms`` and ``size_mb``; ``metrics``
    add the baseline figures (teacher through the same fp32 lowering, timed interleaved
    with the candidate), ``speedup``, ``compression``, spreads, timings, the structure
    fingerprint and the facts of compression. ``measure`` runs the latency job: by default
    (None) in a fresh local process (``run_isolated``), the only timing a trial that ends
    early can cancel, or e.g. on a node of the target; an
    identical structure's figures from ``guide.known_latency`` are reused instead. A
    failure (exception, NaN, budget exceeded, wrong lowered outputs) sets ``failure``;
    a stop by the ``guide`` (a hopeless rung, quality above the limit, dominated before
    its fine-tune) sets ``stopped`` and keeps the partial figures in ``metrics``.
    ``on_step(done, total)`` follows the fine-tune after each of its steps. ``start`` is
    the recipe's structure to fine-tune from (a slice of the elastic student) instead of
    the one derived from the teacher.
    """
    clock = _StageClock(on_stage)
    started = time.perf_counter()
    trial = _Trial(task, recipe, settings, baseline, guide or Guide(), clock.enter,
                   measure, on_step or (lambda _done, _total: None))
    trial.start = start
    trial.policy.trained_start = start is not None
    try:
        measured = trial.run()
    except TrialStopped as stop:
        return TrialResult(recipe, metrics={**trial.policy.partial, **trial.stop_figures,
                                            "trial_s": time.perf_counter() - started,
                                            "stage_seconds": clock.summary()},
                           stopped=str(stop))
    except Exception as exc:  # a failing recipe must never stop the study
        reason = f"{clock.stage}: {type(exc).__name__}: {one_line(str(exc))}"
        return TrialResult(recipe, failure=reason, metrics={
            "traceback": traceback.format_exc(limit=6)[-2000:],
        })
    finally:
        trial.close()
    if isinstance(measured, TrialResult):
        return measured
    result = _result(recipe, settings, baseline, measured, started)
    result.metrics["stage_seconds"] = clock.summary()
    return result


class _StageClock:
    """The trial's current stage (told to ``on_stage``) and the seconds spent in each stage,
    in the order first entered."""

    def __init__(self, on_stage: Callable[[str], None] | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.stage = "start"  # as named, for a failure's message
        self.current, self.since = "start", time.perf_counter()
        self.on_stage = on_stage

    def enter(self, name: str) -> None:
        """Start stage ``name``; what follows " (" in it is a note, not the stage."""
        self.stage = name
        self._close(name.split(" (")[0])
        if self.on_stage is not None:
            self.on_stage(name)

    def _close(self, following: str) -> None:
        now = time.perf_counter()
        self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self.since
        self.current, self.since = following, now

    def summary(self) -> str:
        """``"stage 1.2 s, ..."``, the current stage closed."""
        self._close(self.current)
        return ", ".join(f"{name} {s:.1f} s" for name, s in self.seconds.items() if s >= 0.05)


@dataclass
class _Measured:
    """What a trial measured of its compressed model, before the figures are derived."""

    model: nn.Module
    facts: dict[str, Any]
    quality: float
    size: float
    latency: dict[str, Any]
    batch_size: int
    compress_seconds: float


class _Trial:
    """One trial's pipeline: structure first, fine-tune under the rung policy, gate, time."""

    def __init__(self, task: Task, recipe: Recipe, settings: TrialSettings, baseline: Baseline,
                 guide: Guide, stage: Callable[[str], None], measure: Measure | None,
                 on_step: Callable[[int, int], None]):
        self.task, self.recipe, self.settings, self.baseline = task, recipe, settings, baseline
        self.guide, self.stage = guide, stage
        self.share = ComputeShare()
        self.timer = StructureTimer(task, recipe.quantization.scheme, settings.latency,
                                    baseline, measure, guide.known_latency, stage, self.share)
        self.policy = RungPolicy(task, baseline, guide, self.timer, self.share, stage, on_step)
        self.stop_figures: dict[str, Any] = {}
        self.start: nn.Module | None = None

    def close(self) -> None:
        """End what the trial leaves running: a timing no longer wanted, the compute share."""
        self.timer.close()
        self.share.release()

    def run(self) -> _Measured | TrialResult:
        """Compress (stopping at hopeless rungs), gate on quality, then time the model
        unless an identical structure was timed before. Raises for a failing recipe,
        TrialStopped for a stopped one."""
        started = time.perf_counter()
        deadline = Deadline(self.settings.finetune.trial_timeout_s,
                            "finetune.trial_timeout_s")
        untrained = self._structure_first(deadline)
        compressed, facts = untrained or self._compress(deadline, self.settings.finetune.steps,
                                                        watch=self.policy.watches())
        if "stopped" in facts:
            self.stop_figures = {"stopped_at_step": facts["stopped_at_step"],
                                 "finetune_steps": facts["finetune_steps"]}
            raise TrialStopped(facts["stopped"])
        compress_seconds = time.perf_counter() - started
        facts = {**facts, **{k: self.policy.partial[k] for k in ("rungs", "promoted")
                             if k in self.policy.partial}}
        self.stage("quality")
        self.share.pause_point()
        quality = quality_of(self.task, compressed)
        if not math.isfinite(quality):
            return TrialResult(self.recipe, failure=f"quality is {quality}")
        size = size_mb(compressed)
        self.share.release()
        self.policy.partial.update(quality=quality, size_mb=size, compress_s=compress_seconds,
                                   quality_drop=quality_drop(self.baseline.quality, quality),
                                   **_plain(facts))
        self.policy.gate(quality)
        deadline.check("evaluation")
        latency = self.timer.final(compressed)
        deadline.check("latency measurement")
        return _Measured(compressed, facts, quality, size, latency, self.timer.batch(),
                         compress_seconds)

    def _compress(self, deadline: Deadline, steps: int, watch: bool) -> tuple[nn.Module, dict]:
        finetune = self.settings.finetune
        self.policy.watching = watch
        try:
            with torch_threads(finetune.threads or torch.get_num_threads()):
                return compress(
                    self.task.model, self.recipe, example_input=self.task.example_input,
                    train=self.task.train, calibration=calibration_batches(self.task),
                    finetune_steps=steps, learning_rate=finetune.learning_rate,
                    seed=self.settings.seed, student_factory=self.task.student,
                    deadline=deadline, on_stage=self.stage, watch=self.policy,
                    structure=self.start)
        finally:
            self.share.release()

    def _structure_first(self, deadline: Deadline) -> tuple[nn.Module, dict] | None:
        """Compress the structure first (untrained) when that saves work: time it on a
        thread of its own while it fine-tunes (``latency.overlap``); with an identical
        structure timed before, skip a fine-tune that could not give a point off the
        feasible front (its size and latency are known without it); keep it for the
        promotion and halving rules. Returns the compressed model when the recipe needs no
        fine-tune (it is then final)."""
        stopping, dominated = self.guide.stopping, self.guide.dominated
        stops = self.policy.watches()
        skips = stops and stopping.skip_dominated and dominated is not None
        promotes = (stops and self.guide.promotions_left > 0
                    and stopping.promote_steps > self.settings.finetune.steps)
        halves = stops and stopping.halving >= 2
        overlaps = self.settings.latency.overlap
        if self.settings.finetune.steps == 0 or not (overlaps or skips or promotes or halves):
            return None
        self.stage("structure")
        structure, facts = self._compress(deadline, 1, watch=False)
        if facts.get("finetune_steps", 0) == 0:
            return structure, facts  # nothing to fine-tune: this is the trial's model
        known = self.timer.keep_structure(structure, overlap=overlaps)
        if known is not None and skips:
            size = self.timer.structure_size()
            winner = dominated(known["latency_ms"], size)
            if winner is not None:
                self.policy.partial.update(known, size_mb=size)
                raise TrialStopped(f"dominated before its fine-tune by {winner}")
        return None


def _plain(facts: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in facts.items() if isinstance(v, (bool, int, float, str))}


def _result(recipe: Recipe, settings: TrialSettings, baseline: Baseline, m: _Measured,
            started: float) -> TrialResult:
    """The trial's values and metrics from what it measured."""
    latency = m.latency
    values = {"quality": m.quality, "latency_ms": latency["latency_ms"], "size_mb": m.size}
    metrics = {
        **_plain(m.facts),
        **values,
        **latency,
        "baseline_quality": baseline.quality,
        "baseline_size_mb": baseline.size_mb,
        "quality_drop": quality_drop(baseline.quality, m.quality),
        "compression": baseline.size_mb / m.size,
        "latency_batch_size": m.batch_size,
        "threads": settings.latency.threads,
        "baseline_parameters": baseline.parameters,
        "compress_s": m.compress_seconds,
        "trial_s": time.perf_counter() - started,
        "target": detect_target(settings.latency.target).to_dict(),
        "seed": settings.seed,
    }
    return TrialResult(recipe, values, metrics)
