"""How a trial measures: the teacher's baseline, quality on val or on a held-out slice, the
calibration batches, and the latency job timing a model against the teacher."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice

import torch
from torch import nn

from ..evaluators import LatencyJob, LatencyReport, accuracy, program_bytes, size_mb
from ..kernels import dense_execution, sparse_execution
from ..spaces import count_parameters, model_io
from ._errors import ParetoslimError
from ._spec import LatencySpec
from ._task import Task

CALIBRATION_BATCHES = 8

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


def latency_job(task: Task, model: nn.Module, scheme: str, latency: LatencySpec,
                baseline: Baseline) -> LatencyJob:
    """The job timing ``model`` against the teacher at the latency settings' batch size."""
    x = latency_input(task, latency)
    sparse = sparse_execution(model)
    return LatencyJob(
        program=program_bytes(dense_execution(model), x),
        reference=baseline.reference_program(task.model, x),
        example=x, scheme=scheme, lowering=latency.lowering, threads=latency.threads,
        min_calls=latency.min_calls, min_seconds=latency.min_seconds,
        max_spread=latency.max_spread,
        sparse_program=None if sparse is None else program_bytes(sparse, x))
