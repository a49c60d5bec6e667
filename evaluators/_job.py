"""Latency measured in a fresh process: compile, check and time one candidate against the teacher.

A process that has compiled and run one int8 model measures the next one wrongly: oneDNN
keeps prepacked weights per shape, and a second model with same-shaped layers but other
quantization parameters re-orders its weights on every call (17-43% slower at batch 1).
So each candidate is measured by a process that has run no other model: the job carries
exported programs (no user classes to import), and the teacher's compiled package is
cached on disk per machine, keyed by its program, input shape, threads and CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..kernels import detect_target, lower, register_quantized_ops
from ..spaces import model_io
from ._latency import SpeedupMeasurement, measure_speedup, time_interleaved, torch_threads

CACHE_ENV = "PARETOSLIM_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/paretoslim")
# the measuring process's time-out (``job_timeout``): generous, it only ends a hung process
COMPILE_ALLOWANCE_S = 600.0  # per program lowered (compiling takes 2-17 s; 60 s seen loaded)
TIMING_CAP_S = 60.0  # ``time_interleaved`` stops a round of timing after this
CALL_BOUND_S = 1.0  # the slowest single call of a model expected
TIMING_ROUNDS = 3  # rounds of timing a job can take: two attempts and a sparse duel
CANCEL_POLL_S = 0.2  # how soon a cancelled measurement's process is ended
# the metrics of a latency report (``LatencyReport.metrics``), reused for an identical structure
LATENCY_FIGURES = ("latency_ms", "baseline_latency_ms", "speedup", "speedup_spread",
                   "speedup_low", "speedup_high",
                   "latency_noisy", "latency_attempts", "latency_iqr_ms", "latency_cov",
                   "baseline_latency_iqr_ms", "latency_calls", "lowering", "lowering_error",
                   "compile_s", "measured_on", "sparse_execution", "sparse_speedup")
_PARENT_ENV = "PARETOSLIM_JOB_PARENT"  # the measuring process's parent, to die with it


class MeasurementError(RuntimeError):
    """The measuring process died or could not run the job."""


class MeasurementCancelled(MeasurementError):
    """The measurement was no longer wanted: its process was ended."""


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
    example: model_io.Inputs
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
        """The figures as flat trial metrics, named as in ``LATENCY_FIGURES``."""
        model, base = self.timing.model, self.timing.baseline
        return {
            "latency_ms": model.median_ms,
            "baseline_latency_ms": base.median_ms,
            "speedup": self.timing.speedup,
            "speedup_spread": self.timing.speedup_spread,
            "speedup_low": self.timing.speedup_low,
            "speedup_high": self.timing.speedup_high,
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


def program_bytes(model: nn.Module, example: model_io.Inputs) -> bytes:
    """``model`` exported for ``example``'s exact shapes, saved to bytes."""
    model.eval()
    with torch.no_grad():
        program = model_io.export(model, example)
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


def job_timeout(job: LatencyJob) -> float:
    """How long the measuring process of ``job`` may take before it is taken as hung.

    ``COMPILE_ALLOWANCE_S`` per program lowered (candidate, teacher, sparse variant) plus
    ``TIMING_ROUNDS`` rounds of timing, each at most its ``min_seconds`` or the harness's
    cap, whichever is longer, plus ``min_calls`` calls of ``CALL_BOUND_S``.
    """
    programs = 3 if job.sparse_program is not None else 2
    timing = max(job.min_seconds, TIMING_CAP_S) + job.min_calls * CALL_BOUND_S
    return programs * COMPILE_ALLOWANCE_S + TIMING_ROUNDS * timing


def _child_command(job_path: Path, out_path: Path) -> list[str]:
    """The measuring process's command line (a seam for the tests). runpy's warning that
    the module was imported with its package is noise that would end its error output."""
    return [sys.executable, "-W", "ignore::RuntimeWarning:runpy", "-m", __name__,
            str(job_path), str(out_path)]


def run_isolated(job: LatencyJob, timeout_s: float | None = None,
                 cancel: threading.Event | None = None) -> LatencyReport:
    """``run_latency_job`` in a new Python process; its exceptions are raised here. A job
    with a ``run()`` method (e.g. ``LayerTimingJob``) runs that instead; pass its ``timeout_s``.

    The process runs in a process group of its own, ended with everything it started when
    it exceeds ``timeout_s`` (default: ``job_timeout(job)``), when ``cancel`` is set (then
    MeasurementCancelled is raised), or when this process is interrupted
    (KeyboardInterrupt, e.g. Ctrl-C or SIGTERM); its temporary files are removed either
    way. Raises MeasurementError when the process dies (e.g. a native crash) or exceeds
    its time-out.
    """
    timeout_s = job_timeout(job) if timeout_s is None else timeout_s
    with tempfile.TemporaryDirectory(prefix="paretoslim-job-") as scratch:
        job_path, out_path = Path(scratch) / "job.pkl", Path(scratch) / "report.pkl"
        job_path.write_bytes(pickle.dumps(job))
        code, stderr = _run_child(_child_command(job_path, out_path), timeout_s, cancel)
        if not out_path.is_file():
            how = (f"was killed by signal {-code}" if code < 0
                   else f"exited with code {code}")
            tail = " ".join(stderr.strip().splitlines()[-1:])
            raise MeasurementError(f"the measuring process {how}: {tail}".rstrip(": "))
        outcome = pickle.loads(out_path.read_bytes())
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _run_child(command: list[str], timeout_s: float,
               cancel: threading.Event | None = None) -> tuple[int, str]:
    """Run ``command`` in a new session; its return code and standard error. The whole
    process group is killed when it times out, ``cancel`` is set or this process is
    interrupted."""
    with tempfile.TemporaryFile("w+") as errors:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors,
                                 start_new_session=True,
                                 env={**os.environ, _PARENT_ENV: str(os.getpid())})
        try:
            code = _wait(child, timeout_s, cancel)
        except MeasurementCancelled:
            _kill_group(child)
            raise
        except subprocess.TimeoutExpired:
            _kill_group(child)
            raise MeasurementError(
                f"the measuring process took longer than {timeout_s:.0f} s (its time-out, "
                "from the timing settings) and was killed") from None
        except BaseException:
            _kill_group(child)
            raise
        _kill_group(child)  # what it left behind, e.g. compile workers
        errors.seek(0)
        return code, errors.read()


def _wait(child: subprocess.Popen, timeout_s: float, cancel: threading.Event | None) -> int:
    """``child.wait(timeout_s)``, raising MeasurementCancelled soon after ``cancel`` is set."""
    if cancel is None:
        return child.wait(timeout=timeout_s)
    ends = time.monotonic() + timeout_s
    while True:
        if cancel.is_set():
            raise MeasurementCancelled("the measurement was cancelled")
        try:
            return child.wait(timeout=max(0.0, min(CANCEL_POLL_S, ends - time.monotonic())))
        except subprocess.TimeoutExpired:
            if time.monotonic() >= ends:
                raise


def _kill_group(child: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGKILL the child's process group and wait (up to ``grace_s``) until none of its
    members still runs: a signalled process dies asynchronously, and one still alive
    would hold the cores (and the latency lock) after we return."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    child.wait()
    deadline = time.monotonic() + grace_s
    while _group_runs(child.pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _group_runs(group: int) -> bool:
    """Whether a process of ``group`` is alive and not a zombie (Linux ``/proc``; False
    elsewhere)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == group and fields[0] != "Z":
                return True
    return False


def _die_with_parent() -> None:
    """Have Linux kill this process when its parent dies, even by SIGKILL (no-op elsewhere):
    a measuring process left behind would hold the machine's latency lock."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    parent = os.environ.get(_PARENT_ENV)
    if parent and os.getppid() != int(parent):  # it died before the request took effect
        os._exit(1)


def _main(job_path: str, out_path: str) -> None:
    _die_with_parent()
    job = pickle.loads(Path(job_path).read_bytes())
    try:  # another kind of job (e.g. layer micro-timings) says how it runs
        outcome: Any = job.run() if hasattr(job, "run") else run_latency_job(job)
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


def save_json(path: str | Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path``, whole or not at all (a temporary file renamed
    over it), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    scratch.write_text(json.dumps(value))
    os.replace(scratch, path)


def _teacher_package(job: LatencyJob) -> Path:
    """Where the teacher's package for this job's shape, threads and machine is cached."""
    key = hashlib.sha256(job.reference)
    target = detect_target()
    for part in (model_io.signature(job.example), job.threads, torch.__version__,
                 sys.version_info[:2], platform.machine(), target.cpu,
                 sorted(target.flags)):
        key.update(repr(part).encode())
    return cache_dir() / "aoti" / f"teacher-{key.hexdigest()[:24]}.pt2"


if __name__ == "__main__":  # through the package, so pickled classes keep their module
    from paretoslim.evaluators._job import _main as main

    main(sys.argv[1], sys.argv[2])
