"""The latency of a trial's structures, timed once: a structure identical to one timed before
(same fingerprint) reuses its figures, and a structure can be timed on a thread of its own
while its fine-tune runs."""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from ..evaluators import (
    ComputeShare,
    LatencyJob,
    LatencyReport,
    run_isolated,
    size_mb,
)
from ..spaces import SPARSE_MODULES, model_io
from ._fingerprint import structure_fingerprint
from ._measuring import Baseline, Measure, latency_input, latency_job
from ._spec import LatencySpec
from ._task import Task


class StructureTimer:
    """The latency figures of one trial's models, each structure timed at most once.

    ``known(fingerprint)`` gives the figures of a structure the study timed before (or
    None); ``measure`` runs a latency job (None: ``run_isolated``, in a fresh local
    process that a timing no longer wanted ends); ``stage(name)`` names the work under way; the
    compute ``share`` is released before a timing waits for the machine.
    """

    def __init__(self, task: Task, scheme: str, latency: LatencySpec, baseline: Baseline,
                 measure: Measure | None, known: Callable[[str], dict[str, Any] | None],
                 stage: Callable[[str], None], share: ComputeShare):
        self.task, self.scheme, self.latency, self.baseline = task, scheme, latency, baseline
        self.measure, self.known, self.stage, self.share = measure, known, stage, share
        self.timed: dict[str, dict[str, Any]] = {}  # figures this trial measured
        self.pending: _Pending | None = None  # a structure timed while the trial goes on
        self.structure: nn.Module | None = None  # the structure before its fine-tune
        self._structure_fingerprint = ""
        self._structure_size: float | None = None

    def fingerprint(self, model: nn.Module) -> str:
        x = latency_input(self.task, self.latency)
        timing = {"target": self.latency.target, "lowering": self.latency.lowering,
                  "threads": self.latency.threads, "batch": model_io.batch_size(x)}
        if not isinstance(x, torch.Tensor):  # names, other dimensions
            timing["inputs"] = repr(model_io.signature(x))
        return structure_fingerprint(model, self.scheme, timing)

    def batch(self) -> int:
        """The batch size latency is timed at."""
        return model_io.batch_size(latency_input(self.task, self.latency))

    def keep_structure(self, structure: nn.Module, *, overlap: bool) -> dict[str, Any] | None:
        """Keep the untrained ``structure`` for the rung rules; return the figures of an
        identical structure timed before, else (``overlap``) start timing it now."""
        self.structure = structure
        fingerprint = self._structure_fingerprint = self.fingerprint(structure)
        known = self.known(fingerprint)
        if known is None and overlap:
            self.pending = _Pending(fingerprint, self._job(structure), self.measure)
        return known

    def structure_size(self) -> float:
        """The size of the kept structure (serialized once)."""
        if self._structure_size is None:
            self._structure_size = size_mb(self.structure)
        return self._structure_size

    def structure_latency(self) -> dict[str, Any]:
        """The latency figures of the kept structure, timed on the untrained copy (dense
        kernels do not depend on the weights' values) and kept for the trained model."""
        return self._timed(self.structure, self._structure_fingerprint,
                           "latency of the structure")

    def final(self, model: nn.Module) -> dict[str, Any]:
        """The latency figures of the trial's final model, with its ``structure``."""
        fingerprint = self.fingerprint(model)
        # timed before the fine-tune: by this trial, done or under way (neither happens for
        # a structure the study knows, whose figures _timed gives)
        before = fingerprint in self.timed or (self.pending is not None
                                               and self.pending.fingerprint == fingerprint)
        latency = self._timed(model, fingerprint, "latency")
        return {**latency, **({"latency_timed_before_finetune": True} if before else {}),
                "structure": fingerprint}

    def close(self) -> None:
        """End a timing no longer wanted."""
        if self.pending is not None:
            self.pending.abandon()
            self.pending = None

    def _timed(self, model: nn.Module, fingerprint: str, stage: str) -> dict[str, Any]:
        """An identical structure's figures (from the study, or timed by this trial), else
        those of its timing in progress, else timed now."""
        known = self.known(fingerprint) or self.timed.get(fingerprint)
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
            report = (self.measure or run_isolated)(job)
        self.timed[fingerprint] = _metrics(report, job, model)
        return self.timed[fingerprint]

    def _job(self, model: nn.Module) -> LatencyJob:
        self.stage("export")
        return latency_job(self.task, model, self.scheme, self.latency, self.baseline)


class _Pending:
    """A latency job measured on a thread of its own while the trial goes on.

    The default measure (None or ``run_isolated``) is cancellable: ``abandon`` ends its
    process. Another measure (e.g. on a cluster node) runs to its end, its figures dropped.
    """

    def __init__(self, fingerprint: str, job: LatencyJob, measure: Measure | None):
        self.fingerprint, self.job = fingerprint, job
        self.cancel = threading.Event()
        self.cancellable = measure is None or measure is run_isolated
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
