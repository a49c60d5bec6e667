"""Latency measured in a fresh process: compile, check and time one candidate against the teacher.

A process that has compiled and run one int8 model measures the next one wrongly: oneDNN
keeps prepacked weights per shape, and a second model with same-shaped layers but other
quantization parameters re-orders its weights on every call (17-43% slower at batch 1).
So each candidate is measured by a process that has run no other model: the job carries
exported programs (no user classes to import), and the teacher's compiled package is
cached on disk per machine, keyed by its program, input shape, threads and CPU.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import platform
import socket
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..kernels import detect_target, lower, register_quantized_ops
from ._latency import SpeedupMeasurement, measure_speedup, time_interleaved, torch_threads

CACHE_ENV = "PARETOSLIM_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/paretoslim")


class MeasurementError(RuntimeError):
    """The measuring process died or could not run the job."""


@dataclass(frozen=True)
class LatencyJob:
    """Everything needed to time a candidate against the teacher on another process or node.

    ``program`` and ``reference`` are ``torch.export`` programs saved to bytes (see
    ``program_bytes``) of the candidate and of the fp32 teacher, for ``example``'s shape.
    ``sparse_program``, for a candidate with sparsely stored layers, is its variant running
    them through ``torch.sparse.mm``; the faster of the two is kept.
    """

    program: bytes
    reference: bytes
    example: torch.Tensor
    scheme: str
    lowering: str = "aoti"
    threads: int = 1
    min_calls: int = 300
    min_seconds: float = 1.0
    max_spread: float = 0.05
    sparse_program: bytes | None = None


@dataclass(frozen=True)
class LatencyReport:
    """What a latency job measured, and where."""

    timing: SpeedupMeasurement
    lowering: str
    compile_seconds: float
    max_relative_error: float
    host: str
    process_id: int
    sparse_execution: str = "none"
    sparse_speedup: float | None = None

    def metrics(self) -> dict[str, Any]:
        """The figures as flat trial metrics."""
        model, base = self.timing.model, self.timing.baseline
        return {
            "latency_ms": model.median_ms,
            "baseline_latency_ms": base.median_ms,
            "speedup": self.timing.speedup,
            "speedup_spread": self.timing.speedup_spread,
            "latency_noisy": self.timing.noisy,
            "latency_attempts": self.timing.attempts,
            "latency_iqr_ms": model.iqr_ms,
            "latency_cov": model.cov,
            "baseline_latency_iqr_ms": base.iqr_ms,
            "latency_calls": model.calls,
            "lowering": self.lowering,
            "lowering_error": self.max_relative_error,
            "compile_s": self.compile_seconds,
            "measured_on": self.host,
            "sparse_execution": self.sparse_execution,
            **({} if self.sparse_speedup is None else {"sparse_speedup": self.sparse_speedup}),
        }


def program_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    """``model`` exported for ``example``'s exact shape, saved to bytes."""
    model.eval()
    with torch.no_grad():
        program = torch.export.export(model, (example.clone(),))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def run_latency_job(job: LatencyJob) -> LatencyReport:
    """Lower both programs, check them against eager, and time them interleaved, here.

    The teacher's AOTInductor package is reused from the machine's cache when present.
    With a ``sparse_program``, both executions are lowered and timed against each other
    first; the report's ``sparse_execution`` says which one was kept ("sparse" or
    "densified") and ``sparse_speedup`` by how much sparse beat dense (below 1: it lost).
    Raises LoweringError for a wrong lowering. Call it in a fresh process (``run_isolated``)
    unless this process has compiled no other quantized model.
    """
    if job.scheme.startswith("int8"):
        register_quantized_ops()
    candidate = _load(job.program)
    teacher = _load(job.reference)
    x = job.example
    sparse_execution, sparse_speedup = "none", None
    torch._dynamo.reset()
    try:
        with torch_threads(job.threads):
            lowered = lower(candidate, x, job.scheme, job.lowering)
            if job.sparse_program is not None:
                sparse = lower(_load(job.sparse_program), x, job.scheme, job.lowering)
                duel = time_interleaved(
                    {"dense": lowered.fn, "sparse": sparse.fn}, x, threads=job.threads,
                    min_calls=max(20, job.min_calls // 4), min_seconds=job.min_seconds / 4)
                sparse_speedup = duel["dense"].median_ms / duel["sparse"].median_ms
                sparse_execution = "sparse" if sparse_speedup > 1.0 else "densified"
                if sparse_speedup > 1.0:
                    lowered = sparse
            package = _teacher_package(job) if job.lowering == "aoti" else None
            if package is None:
                reference = lower(teacher, x, "fp32", job.lowering)
            else:
                from filelock import FileLock

                with FileLock(f"{package}.lock"):
                    reference = lower(teacher, x, "fp32", job.lowering, package=package)
            timing = measure_speedup(
                lowered.fn, reference.fn, x, threads=job.threads, min_calls=job.min_calls,
                min_seconds=job.min_seconds, max_spread=job.max_spread)
    finally:
        torch._dynamo.reset()
    return LatencyReport(timing, lowered.backend, lowered.compile_seconds,
                         lowered.max_relative_error, socket.gethostname(), os.getpid(),
                         sparse_execution, sparse_speedup)


def run_isolated(job: LatencyJob, timeout_s: float | None = None) -> LatencyReport:
    """``run_latency_job`` in a new Python process; its exceptions are raised here.

    Raises MeasurementError when the process dies (e.g. a native crash) or exceeds
    ``timeout_s``.
    """
    with tempfile.TemporaryDirectory(prefix="paretoslim-job-") as scratch:
        job_path, out_path = Path(scratch) / "job.pkl", Path(scratch) / "report.pkl"
        job_path.write_bytes(pickle.dumps(job))
        try:
            done = subprocess.run(
                [sys.executable, "-m", __name__, str(job_path), str(out_path)],
                capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise MeasurementError(
                f"the measuring process took longer than {timeout_s:.0f} s") from None
        if not out_path.is_file():
            how = (f"was killed by signal {-done.returncode}" if done.returncode < 0
                   else f"exited with code {done.returncode}")
            tail = " ".join(done.stderr.strip().splitlines()[-1:])
            raise MeasurementError(f"the measuring process {how}: {tail}".rstrip(": "))
        outcome = pickle.loads(out_path.read_bytes())
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _main(job_path: str, out_path: str) -> None:
    job = pickle.loads(Path(job_path).read_bytes())
    try:
        outcome: Any = run_latency_job(job)
    except Exception as exc:
        outcome = exc
        try:
            pickle.dumps(exc)
        except Exception:
            outcome = RuntimeError(f"{type(exc).__name__}: {exc}")
        sys.stderr.write(traceback.format_exc())
    Path(out_path).write_bytes(pickle.dumps(outcome))


def _load(data: bytes) -> torch.export.ExportedProgram:
    return torch.export.load(io.BytesIO(data))


def cache_dir() -> Path:
    """$PARETOSLIM_CACHE, else ``~/.cache/paretoslim``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def _teacher_package(job: LatencyJob) -> Path:
    """Where the teacher's package for this job's shape, threads and machine is cached."""
    key = hashlib.sha256(job.reference)
    target = detect_target()
    for part in (tuple(job.example.shape), job.example.dtype, job.threads, torch.__version__,
                 sys.version_info[:2], platform.machine(), target.cpu,
                 sorted(target.flags)):
        key.update(repr(part).encode())
    return cache_dir() / "aoti" / f"teacher-{key.hexdigest()[:24]}.pt2"


if __name__ == "__main__":  # through the package, so pickled classes keep their module
    from paretoslim.evaluators._job import _main as main

    main(sys.argv[1], sys.argv[2])
