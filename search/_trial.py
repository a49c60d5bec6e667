"""One trial: compress the teacher by a recipe, lower it, measure it. Imports no search backend."""

from __future__ import annotations

import math
import numbers
import statistics
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from itertools import islice, pairwise
from typing import Any

import torch
from torch import nn

from ..evaluators import (
    ComputeShare,
    LatencyJob,
    LatencyReport,
    accuracy,
    program_bytes,
    run_isolated,
    size_mb,
    torch_threads,
)
from ..kernels import dense_execution, detect_target, sparse_execution
from ..spaces import (
    SPARSE_MODULES,
    Deadline,
    Recipe,
    Stopped,
    compress,
    count_parameters,
    model_io,
)
from ._errors import ParetoslimError
from ._fingerprint import structure_fingerprint
from ._spec import FinetuneSpec, LatencySpec, StoppingSpec, StudySpec
from ._stopping import Rung, RungPoint, halving_reason, promotion_reason, stop_reason
from ._task import Task

CALIBRATION_BATCHES = 8
PACE_STEPS = 100  # the last fine-tune steps whose median time projects a promotion's
# the metrics of a latency measurement, reused for an identical structure
LATENCY_FIGURES = ("latency_ms", "baseline_latency_ms", "speedup", "speedup_spread",
                   "latency_noisy", "latency_attempts", "latency_iqr_ms", "latency_cov",
                   "baseline_latency_iqr_ms", "latency_calls", "lowering", "lowering_error",
                   "compile_s", "measured_on", "sparse_execution", "sparse_speedup")


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


@dataclass
class TrialResult:
    """What a trial reports: objective values and metrics, the reason it failed, or the
    reason it was stopped early (``stopped``; its metrics hold the figures measured so far)."""

    recipe: Recipe
    values: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None
    stopped: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None and self.stopped is None


@dataclass(frozen=True)
class Guide:
    """What the study knows that can save a trial work; every part optional.

    ``stopping`` (None: never stop early) and ``max_quality_drop`` drive the rungs and the
    quality gate; ``known_latency(fingerprint)`` gives the latency metrics of an identical
    structure timed earlier (with ``latency_cached_from``), or None; ``dominated``, when
    the study holds a candidate, maps ``(latency_ms, size_mb)`` to a feasible trial of at
    least the teacher's quality whose latency and size are both at least as good, or None.
    ``promotions_left`` is how many more trials the study may promote (see StoppingSpec);
    ``extends_front(latency_ms, size_mb)`` says whether a feasible point of that latency
    and size would be faster or smaller than every feasible trial so far; ``ends_at``
    (``time.time()``) is when the run's time budget ends: no promotion runs past it.
    ``rung_points`` are the study's earlier trials at their rungs, for successive halving.
    """

    stopping: StoppingSpec | None = None
    max_quality_drop: float = float("inf")
    known_latency: Callable[[str], dict[str, Any] | None] = lambda _fingerprint: None
    dominated: Callable[[float, float], str | None] | None = None
    promotions_left: int = 0
    extends_front: Callable[[float, float], bool] = lambda _latency, _size: True
    ends_at: float = math.inf
    rung_points: tuple[RungPoint, ...] = ()


Measure = Callable[[LatencyJob], LatencyReport]


@dataclass(frozen=True)
class Baseline:
    """The teacher's quality and size, measured once; its latency is re-timed in every trial.

    ``programs`` keeps the teacher's exported program per input shape, exported once.
    """

    quality: float
    size_mb: float
    parameters: int
    programs: dict = field(default_factory=dict, compare=False, repr=False)
    slices: dict = field(default_factory=dict, compare=False, repr=False)

    def slice_quality(self, task: Task, samples: int) -> float:
        """The teacher's quality on the held-out slice of ``samples`` (see ``val_slice``)."""
        if samples not in self.slices:
            self.slices[samples] = quality_of(task, task.model, val_slice(task, samples))
        return self.slices[samples]

    def reference_program(self, teacher: nn.Module, x: model_io.Inputs) -> bytes:
        """The teacher exported for ``x``'s shapes (see ``program_bytes``)."""
        key = model_io.signature(x)
        if key not in self.programs:
            self.programs[key] = program_bytes(teacher, x)
        return self.programs[key]


def one_line(message: str, limit: int = 300) -> str:
    """A message collapsed to one line of at most ``limit`` characters."""
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quality_drop(teacher: float, quality: float) -> float:
    """``teacher - quality`` rounded to 12 decimals, so that a drop of exactly the limit
    (e.g. 93.37% to 92.37%) is not above it by a floating-point residue."""
    return round(teacher - quality, 12)


def quality_of(task: Task, model: nn.Module, val: Iterable | None = None) -> float:
    """The task's metric (default: accuracy) on its validation data (or on ``val``)."""
    metric = task.metric or accuracy
    with torch.no_grad():
        value = metric(model, task.val if val is None else val)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise TypeError(f"the metric returned {type(value).__name__}, not a number")
    return float(value)


def val_slice(task: Task, samples: int) -> list:
    """The first validation batches holding at least ``samples`` inputs (all, if fewer):
    a fixed held-out slice for the fine-tune's rungs."""
    batches, count = [], 0
    for batch in task.val:
        batches.append(batch)
        count += len(model_io.split_batch(batch)[1])
        if count >= samples:
            break
    return batches


def calibration_batches(task: Task) -> Iterable:
    """The task's calibration batches, or the first training batches."""
    if task.calibration is not None:
        return task.calibration
    return list(islice(iter(task.train), CALIBRATION_BATCHES))


def latency_input(task: Task, latency: LatencySpec) -> model_io.Inputs:
    """A copy of the example input resized to the latency settings' batch size along dim 0
    and, for token inputs, to their sequence length along dim 1 (0 keeps either)."""
    x = model_io.clone(task.example_input)
    if latency.batch_size and latency.batch_size != model_io.batch_size(x):
        x = model_io.with_batch(x, latency.batch_size)
    if latency.sequence_length:
        x = model_io.with_sequence(x, latency.sequence_length)
    return x


def measure_baseline(task: Task) -> Baseline:
    """Quality, size and parameter count of the uncompressed teacher. A metric that fails
    on the teacher or gives no finite number raises ParetoslimError: no trial could be
    judged."""
    task.model.eval()
    who = f"task {task.name!r}" if task.name else "the task"
    try:
        quality = quality_of(task, task.model)
    except Exception as exc:  # the user's data and metric: any failure is theirs to see
        raise ParetoslimError(
            f"{who}: the quality of the teacher on val cannot be measured "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); val must yield "
            "(inputs, targets) batches that the model and the metric accept") from None
    if not math.isfinite(quality):
        raise ParetoslimError(f"{who}: the metric gave {quality} for the teacher; it must "
                              "return a finite number")
    return Baseline(quality, size_mb(task.model), count_parameters(task.model))


def latency_job(task: Task, model: nn.Module, scheme: str, settings: TrialSettings,
                baseline: Baseline) -> LatencyJob:
    """The job timing ``model`` against the teacher at the settings' batch size."""
    latency = settings.latency
    x = latency_input(task, latency)
    sparse = sparse_execution(model)
    return LatencyJob(
        program=program_bytes(dense_execution(model), x),
        reference=baseline.reference_program(task.model, x),
        example=x, scheme=scheme, lowering=latency.lowering, threads=latency.threads,
        min_calls=latency.min_calls, min_seconds=latency.min_seconds,
        max_spread=latency.max_spread,
        sparse_program=None if sparse is None else program_bytes(sparse, x))


def run_trial(task: Task, recipe: Recipe, settings: TrialSettings, baseline: Baseline,
              on_stage: Callable[[str], None] | None = None,
              measure: Measure | None = None, guide: Guide | None = None,
              on_step: Callable[[int, int], None] | None = None) -> TrialResult:
    """Compress, lower and measure one recipe; never raises for a failing recipe.

    The result's ``values`` hold ``quality``, ``latency_ms`` and ``size_mb``; ``metrics``
    add the baseline figures (teacher through the same fp32 lowering, timed interleaved
    with the candidate), ``speedup``, ``compression``, spreads, timings, the structure
    fingerprint and the facts of compression. ``measure`` runs the latency job: by default
    in a fresh local process (``run_isolated``), or e.g. on a node of the target; an
    identical structure's figures from ``guide.known_latency`` are reused instead. A
    failure (exception, NaN, budget exceeded, wrong lowered outputs) sets ``failure``;
    a stop by the ``guide`` (a hopeless rung, quality above the limit, dominated before
    its fine-tune) sets ``stopped`` and keeps the partial figures in ``metrics``.
    ``on_step(done, total)`` follows the fine-tune after each of its steps.
    """
    stage_name = "start"
    clock = _StageClock()

    def stage(name: str) -> None:
        nonlocal stage_name
        stage_name = name
        clock.enter(name)
        if on_stage is not None:
            on_stage(name)

    started = time.perf_counter()
    trial = _Trial(task, recipe, settings, baseline, guide or Guide(), stage,
                   measure or run_isolated)
    if on_step is not None:
        trial.on_step = on_step
    try:
        measured = trial.run()
    except Stopped as stop:
        return TrialResult(recipe, metrics={**trial.partial, **stop.figures,
                                            "trial_s": time.perf_counter() - started,
                                            "stage_seconds": clock.summary()},
                           stopped=stop.reason)
    except Exception as exc:  # a failing recipe must never stop the study
        reason = f"{stage_name}: {type(exc).__name__}: {one_line(str(exc))}"
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
    """Seconds spent in each stage of a trial, in the order first entered."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.current, self.since = "start", time.perf_counter()

    def enter(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self.since
        self.current, self.since = name.split(" (")[0], now

    def summary(self) -> str:
        """``"stage 1.2 s, ..."``, the current stage closed."""
        self.enter(self.current)
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


@dataclass
class _Trial:
    """One trial's pipeline; ``partial`` collects figures a stop keeps."""

    task: Task
    recipe: Recipe
    settings: TrialSettings
    baseline: Baseline
    guide: Guide
    stage: Callable[[str], None]
    measure: Measure
    partial: dict[str, Any] = field(default_factory=dict)
    curve: list = field(default_factory=list)
    structure: nn.Module | None = None  # the compressed structure before its fine-tune
    structure_size: float | None = None  # its size_mb, once read
    timed: dict = field(default_factory=dict)  # latency figures this trial measured
    finetune_started: float = 0.0
    step_ends: deque = field(default_factory=lambda: deque(maxlen=PACE_STEPS + 1))
    share: ComputeShare = field(default_factory=ComputeShare)
    pending: _Pending | None = None  # the structure, timed while the trial goes on
    on_step: Callable[[int, int], None] = lambda _done, _total: None  # fine-tune progress
    steps_planned: int = 0  # of the running fine-tune, a promotion's once promoted
    steps_done: int = 0

    def close(self) -> None:
        """End what the trial leaves running: a timing no longer wanted, the compute share."""
        if self.pending is not None:
            self.pending.abandon()
            self.pending = None
        self.share.release()

    def run(self) -> _Measured | TrialResult:
        """Compress (stopping at hopeless rungs), gate on quality, then time the model
        unless an identical structure was timed before. Raises for a failing recipe."""
        started = time.perf_counter()
        deadline = Deadline(self.settings.finetune.trial_timeout_s,
                            "finetune.trial_timeout_s")
        untrained = self._structure_first(deadline)
        compressed, facts = untrained or self._compress(deadline, self.settings.finetune.steps,
                                                        rungs=True)
        compress_seconds = time.perf_counter() - started
        facts = {**facts, **{k: self.partial[k] for k in ("rungs", "promoted")
                             if k in self.partial}}
        self.stage("quality")
        self.share.pause_point()
        quality = quality_of(self.task, compressed)
        if not math.isfinite(quality):
            return TrialResult(self.recipe, failure=f"quality is {quality}")
        size = size_mb(compressed)
        self.share.release()
        self.partial.update(quality=quality, size_mb=size,
                            quality_drop=quality_drop(self.baseline.quality, quality),
                            compress_s=compress_seconds, **_plain(facts))
        self._gate(quality)
        deadline.check("evaluation")
        latency, batch = self._latency(compressed)
        deadline.check("latency measurement")
        return _Measured(compressed, facts, quality, size, latency, batch, compress_seconds)

    def _compress(self, deadline: Deadline, steps: int, rungs: bool) -> tuple[nn.Module, dict]:
        finetune, stopping = self.settings.finetune, self.guide.stopping
        watch = rungs and stopping is not None and stopping.enabled
        self.steps_planned, self.steps_done = steps, 0
        try:
            with torch_threads(finetune.threads or torch.get_num_threads()):
                return compress(
                    self.task.model, self.recipe, example_input=self.task.example_input,
                    train=self.task.train, calibration=calibration_batches(self.task),
                    finetune_steps=steps, learning_rate=finetune.learning_rate,
                    seed=self.settings.seed, student_factory=self.task.student,
                    deadline=deadline, on_stage=self.stage,
                    rungs=stopping.rungs if watch else (),
                    on_rung=self._rung if watch else None,
                    between_steps=self._between_steps)
        finally:
            self.share.release()

    def _between_steps(self) -> None:
        self.step_ends.append(time.perf_counter())
        self.steps_done += 1
        self.on_step(self.steps_done, self.steps_planned)
        self.share.pause_point()

    def _rung(self, step: int, steps: int, model: nn.Module) -> int | None:
        """Record the slice quality at a rung; promote a near miss (its new step count), or
        stop when the curve cannot reach the limit."""
        stopping = self.guide.stopping
        if step == 0:
            self.finetune_started = time.perf_counter()
            self.step_ends.clear()
        quality = quality_of(self.task, model, val_slice(self.task, stopping.slice_samples))
        self.curve.append(Rung(step, steps, quality))
        self.partial["rungs"] = ",".join(f"{r.step}:{r.quality:.4f}" for r in self.curve)
        limit = (self.baseline.slice_quality(self.task, stopping.slice_samples)
                 - self.guide.max_quality_drop)
        promoted = self._promotion(step, steps, limit)
        if promoted is not None:
            return promoted
        reason = stop_reason(self.curve, limit, stopping.slack) or self._halving(step, steps)
        if reason is not None:
            raise Stopped(reason, {"stopped_at_step": step, "finetune_steps": steps})
        return None

    def _halving(self, step: int, steps: int) -> str | None:
        """Why successive halving stops the trial at this rung, or None; the structure's
        latency and size are recorded for the ranking of later trials."""
        eta = self.guide.stopping.halving
        if eta < 2 or step == 0 or step >= steps or self.structure is None:
            return None
        latency, size = self._structure_latency(), self._structure_size()
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
                or self.structure is None or not self._fits(step, stopping.promote_steps)):
            return None
        reason = promotion_reason(self.curve, limit, stopping.promote_margin)
        if reason is None:
            return None
        size, latency = self._structure_size(), self._structure_latency()
        if not self.guide.extends_front(latency["latency_ms"], size):
            return None
        self.partial.update(latency, promoted=reason)  # kept should the trial stop
        self.stage(f"promoted to {stopping.promote_steps} steps")
        self.steps_planned = stopping.promote_steps
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

    def _gate(self, quality: float) -> None:
        stopping = self.guide.stopping
        if stopping is None or not stopping.enabled or stopping.time_infeasible:
            return
        drop = quality_drop(self.baseline.quality, quality)
        if drop > self.guide.max_quality_drop:
            raise Stopped(f"quality drop {drop:.4f} above the limit "
                          f"{self.guide.max_quality_drop:g} after its fine-tune")

    def _fingerprint(self, model: nn.Module) -> str:
        latency = self.settings.latency
        x = latency_input(self.task, latency)
        timing = {"target": latency.target, "lowering": latency.lowering,
                  "threads": latency.threads, "batch": model_io.batch_size(x)}
        if not isinstance(x, torch.Tensor):  # names, other dimensions
            timing["inputs"] = repr(model_io.signature(x))
        return structure_fingerprint(model, self.recipe.quantization.scheme, timing)

    def _batch(self) -> int:
        """The batch size latency is timed at."""
        return model_io.batch_size(latency_input(self.task, self.settings.latency))

    def _structure_first(self, deadline: Deadline) -> tuple[nn.Module, dict] | None:
        """Compress the structure first (untrained) when that saves work: time it on a
        thread of its own while it fine-tunes (``latency.overlap``); with an identical
        structure timed before, skip a fine-tune that could not give a point off the
        feasible front (its size and latency are known without it); keep it for the
        promotion and halving rules. Returns the compressed model when the recipe needs no
        fine-tune (it is then final)."""
        stopping, dominated = self.guide.stopping, self.guide.dominated
        stops = stopping is not None and stopping.enabled
        skips = stops and stopping.skip_dominated and dominated is not None
        promotes = (stops and self.guide.promotions_left > 0
                    and stopping.promote_steps > self.settings.finetune.steps)
        halves = stops and stopping.halving >= 2
        overlaps = self.settings.latency.overlap
        if self.settings.finetune.steps == 0 or not (overlaps or skips or promotes or halves):
            return None
        self.stage("structure")
        structure, facts = self._compress(deadline, 1, rungs=False)
        if facts.get("finetune_steps", 0) == 0:
            return structure, facts  # nothing to fine-tune: this is the trial's model
        self.structure = structure
        fingerprint = self._fingerprint(structure)
        known = self.guide.known_latency(fingerprint)
        if known is not None and skips:
            size = self._structure_size()
            winner = dominated(known["latency_ms"], size)
            if winner is not None:
                self.partial.update(known, size_mb=size)
                raise Stopped(f"dominated before its fine-tune by {winner}")
        if known is None and overlaps:
            self.pending = _Pending(fingerprint, self._job(structure), self.measure)
        return None

    def _structure_size(self) -> float:
        """The size of the trial's structure (serialized once)."""
        if self.structure_size is None:
            self.structure_size = size_mb(self.structure)
        return self.structure_size

    def _structure_latency(self) -> dict[str, Any]:
        """The latency figures of the trial's structure: an identical structure's, or timed
        on the untrained copy (dense kernels do not depend on the weights' values) and kept
        for the trained model."""
        return self._timed(self.structure, self._fingerprint(self.structure),
                           "latency of the structure")

    def _latency(self, model: nn.Module) -> tuple[dict[str, Any], int]:
        fingerprint = self._fingerprint(model)
        # timed before the fine-tune: by this trial, done or under way (neither happens for
        # a structure the study knows, whose figures _timed gives)
        before = fingerprint in self.timed or (self.pending is not None
                                               and self.pending.fingerprint == fingerprint)
        latency = self._timed(model, fingerprint, "latency")
        return {**latency, **({"latency_timed_before_finetune": True} if before else {}),
                "structure": fingerprint}, self._batch()

    def _timed(self, model: nn.Module, fingerprint: str, stage: str) -> dict[str, Any]:
        """The latency figures of ``model``: an identical structure's (from the study, or
        timed by this trial), else those of its timing in progress, else timed now. The
        compute share is released first: the timing waits for it."""
        known = self.guide.known_latency(fingerprint) or self.timed.get(fingerprint)
        if known is not None:
            return known
        self.share.release()
        pending = self.pending  # kept until read: an interruption meanwhile ends it
        if pending is not None and pending.fingerprint == fingerprint:
            self.stage(stage)
            job, report = pending.job, pending.result()
            self.pending = None
        else:
            if pending is not None:
                self.pending = None
                pending.abandon()  # another structure: its figures are not this model's
            job = self._job(model)
            self.stage(stage)
            report = self.measure(job)
        self.timed[fingerprint] = _metrics(report, job, model)
        return self.timed[fingerprint]

    def _job(self, model: nn.Module) -> LatencyJob:
        """The job timing ``model`` against the teacher (``model`` exported)."""
        self.stage("export")
        return latency_job(self.task, model, self.recipe.quantization.scheme, self.settings,
                           self.baseline)


class _Pending:
    """A latency job measured on a thread of its own while the trial goes on.

    The default measure (``run_isolated``) is cancellable: ``abandon`` ends its process.
    Another measure (e.g. on a cluster node) runs to its end, its figures dropped.
    """

    def __init__(self, fingerprint: str, job: LatencyJob, measure: Measure):
        self.fingerprint, self.job = fingerprint, job
        self.cancel = threading.Event()
        self.cancellable = measure is run_isolated
        call = partial(run_isolated, cancel=self.cancel) if self.cancellable else measure
        self.report: LatencyReport | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(call, job), daemon=True,
                                       name="paretoslim-latency")
        self.thread.start()

    def _run(self, call: Measure, job: LatencyJob) -> None:
        try:
            self.report = call(job)
        except BaseException as exc:  # raised where the result is read
            self.error = exc

    def result(self) -> LatencyReport:
        """The report, once measured; the measurement's exception is raised here."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.report

    def abandon(self) -> None:
        """Stop the measurement if it can be stopped; its result is never read."""
        self.cancel.set()
        if self.cancellable:
            self.thread.join()


def _metrics(report: LatencyReport, job: LatencyJob, model: nn.Module) -> dict[str, Any]:
    """A latency report as trial metrics; layers stored sparse with no sparse variant
    timed are said to run densified."""
    latency = report.metrics()
    if job.sparse_program is None and any(isinstance(module, SPARSE_MODULES)
                                          for module in model.modules()):
        latency["sparse_execution"] = "densified"  # no sparse kernel for these layers
    return latency


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
