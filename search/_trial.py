"""One trial: compress the teacher by a recipe, lower it, measure it. Imports no search backend."""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
from torch import nn

from ..evaluators import (
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
    compress,
    count_parameters,
)
from ._spec import FinetuneSpec, LatencySpec, StudySpec
from ._task import Task

CALIBRATION_BATCHES = 8


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
    """What a trial reports: objective values and metrics, or the reason it failed."""

    recipe: Recipe
    values: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


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

    def reference_program(self, teacher: nn.Module, x: torch.Tensor) -> bytes:
        """The teacher exported for ``x``'s shape (see ``program_bytes``)."""
        key = (tuple(x.shape), x.dtype)
        if key not in self.programs:
            self.programs[key] = program_bytes(teacher, x)
        return self.programs[key]


def one_line(message: str, limit: int = 300) -> str:
    """A message collapsed to one line of at most ``limit`` characters."""
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quality_of(task: Task, model: nn.Module) -> float:
    """The task's metric (default: accuracy) on its validation data."""
    metric = task.metric or accuracy
    with torch.no_grad():
        return float(metric(model, task.val))


def calibration_batches(task: Task) -> Iterable:
    """The task's calibration batches, or the first training batches."""
    if task.calibration is not None:
        return task.calibration
    return list(islice(iter(task.train), CALIBRATION_BATCHES))


def latency_input(task: Task, batch_size: int) -> torch.Tensor:
    """The example input resized along dim 0 to ``batch_size`` (0 keeps it)."""
    x = task.example_input
    if batch_size == 0 or batch_size == x.shape[0]:
        return x.clone()
    repeats = math.ceil(batch_size / x.shape[0])
    return x.repeat(repeats, *([1] * (x.dim() - 1)))[:batch_size].clone()


def measure_baseline(task: Task) -> Baseline:
    """Quality, size and parameter count of the uncompressed teacher."""
    task.model.eval()
    return Baseline(quality_of(task, task.model), size_mb(task.model),
                    count_parameters(task.model))


def latency_job(task: Task, model: nn.Module, scheme: str, settings: TrialSettings,
                baseline: Baseline) -> LatencyJob:
    """The job timing ``model`` against the teacher at the settings' batch size."""
    latency = settings.latency
    x = latency_input(task, latency.batch_size)
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
              measure: Measure | None = None) -> TrialResult:
    """Compress, lower and measure one recipe; never raises for a failing recipe.

    The result's ``values`` hold ``quality``, ``latency_ms`` and ``size_mb``; ``metrics``
    add the baseline figures (teacher through the same fp32 lowering, timed interleaved
    with the candidate), ``speedup``, ``compression``, spreads, timings and the facts of
    compression. ``measure`` runs the latency job: by default in a fresh local process
    (``run_isolated``), or e.g. on a node of the target. A failure (exception, NaN, budget
    exceeded, wrong lowered outputs) sets ``failure`` to the reason.
    """
    stage_name = "start"

    def stage(name: str) -> None:
        nonlocal stage_name
        stage_name = name
        if on_stage is not None:
            on_stage(name)

    started = time.perf_counter()
    try:
        measured = _measure(task, recipe, settings, baseline, stage, measure or run_isolated)
    except Exception as exc:  # a failing recipe must never stop the study
        reason = f"{stage_name}: {type(exc).__name__}: {one_line(str(exc))}"
        return TrialResult(recipe, failure=reason, metrics={
            "traceback": traceback.format_exc(limit=6)[-2000:],
        })
    if isinstance(measured, TrialResult):
        return measured
    return _result(recipe, settings, baseline, measured, started)


@dataclass
class _Measured:
    """What a trial measured of its compressed model, before the figures are derived."""

    model: nn.Module
    facts: dict[str, Any]
    quality: float
    size: float
    job: LatencyJob
    report: LatencyReport
    compress_seconds: float


def _measure(task: Task, recipe: Recipe, settings: TrialSettings, baseline: Baseline,
             stage: Callable[[str], None], measure: Measure) -> _Measured | TrialResult:
    """Compress the teacher by ``recipe``, then measure quality, size and latency; a
    TrialResult instead when the quality is not finite. Raises for a failing recipe."""
    started = time.perf_counter()
    finetune = settings.finetune
    deadline = Deadline(finetune.trial_timeout_s)
    with torch_threads(finetune.threads or torch.get_num_threads()):
        compressed, facts = compress(
            task.model, recipe,
            example_input=task.example_input, train=task.train,
            calibration=calibration_batches(task),
            finetune_steps=finetune.steps, learning_rate=finetune.learning_rate,
            seed=settings.seed, student_factory=task.student, deadline=deadline,
            on_stage=stage,
        )
    compress_seconds = time.perf_counter() - started

    stage("quality")
    quality = quality_of(task, compressed)
    if not math.isfinite(quality):
        return TrialResult(recipe, failure=f"quality is {quality}")
    size = size_mb(compressed)
    deadline.check("evaluation")

    stage("export")
    job = latency_job(task, compressed, recipe.quantization.scheme, settings, baseline)
    stage("latency")
    report = measure(job)
    deadline.check("latency measurement")
    return _Measured(compressed, facts, quality, size, job, report, compress_seconds)


def _result(recipe: Recipe, settings: TrialSettings, baseline: Baseline, m: _Measured,
            started: float) -> TrialResult:
    """The trial's values and metrics from what it measured."""
    latency = m.report.metrics()
    if m.job.sparse_program is None and any(isinstance(module, SPARSE_MODULES)
                                            for module in m.model.modules()):
        latency["sparse_execution"] = "densified"  # no sparse kernel for these layers
    values = {"quality": m.quality, "latency_ms": latency["latency_ms"], "size_mb": m.size}
    metrics = {
        **{k: v for k, v in m.facts.items() if isinstance(v, (bool, int, float, str))},
        **values,
        **latency,
        "baseline_quality": baseline.quality,
        "baseline_size_mb": baseline.size_mb,
        "quality_drop": baseline.quality - m.quality,
        "compression": baseline.size_mb / m.size,
        "latency_batch_size": int(m.job.example.shape[0]),
        "threads": settings.latency.threads,
        "baseline_parameters": baseline.parameters,
        "compress_s": m.compress_seconds,
        "trial_s": time.perf_counter() - started,
        "target": detect_target(settings.latency.target).to_dict(),
        "seed": settings.seed,
    }
    return TrialResult(recipe, values, metrics)
