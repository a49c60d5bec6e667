import copy
import os
import pickle
import sys
import time

import pytest
import torch
from _tiny import InputMutating, TinyCNN, TinyMLP
from torch import nn

from paretoslim.evaluators import (
    LatencyJob,
    MeasurementError,
    program_bytes,
    run_isolated,
    run_latency_job,
)
from paretoslim.kernels import LoweringError
from paretoslim.spaces import quantize


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PARETOSLIM_CACHE", str(tmp_path / "cache"))


def _job(model: nn.Module, teacher: nn.Module, x: torch.Tensor, scheme: str = "fp32"):
    return LatencyJob(program=program_bytes(model, x), reference=program_bytes(teacher, x),
                      example=x, scheme=scheme, min_calls=20, min_seconds=0.0)


def test_job_is_measured_in_a_fresh_process_and_teacher_package_is_cached(tmp_path):
    torch.manual_seed(0)
    teacher, x = TinyCNN().eval(), torch.randn(4, 1, 8, 8)
    calibration = [(torch.randn(4, 1, 8, 8), None) for _ in range(2)]
    student = quantize(TinyCNN().eval(), "int8_static", x, calibration)
    job = _job(student, teacher, x, "int8_static")
    assert pickle.loads(pickle.dumps(job)).scheme == "int8_static"

    first = run_isolated(job)
    assert first.process_id != os.getpid()
    assert first.lowering == "aoti" and first.max_relative_error <= 0.1
    assert first.timing.model.calls >= 20 and first.timing.baseline.calls >= 20
    packages = list((tmp_path / "cache" / "aoti").glob("teacher-*.pt2"))
    assert len(packages) == 1
    stamp = packages[0].stat().st_mtime_ns

    second = run_isolated(job)
    assert second.process_id not in (first.process_id, os.getpid())
    assert packages[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    metrics = second.metrics()
    assert metrics["speedup"] == pytest.approx(
        metrics["baseline_latency_ms"] / metrics["latency_ms"])


def test_a_wrong_lowering_is_raised_in_the_caller():
    x = torch.randn(4, 3)
    job = LatencyJob(program=program_bytes(InputMutating(), x),
                     reference=program_bytes(InputMutating(), x), example=x, scheme="fp32",
                     lowering="compile", min_calls=10, min_seconds=0.0)
    try:
        run_latency_job(job)
    except LoweringError:
        with pytest.raises(LoweringError, match="modified its input"):
            run_isolated(job)
    else:  # exported programs are functional: the lowering is then right and timed
        assert run_isolated(job).timing.model.calls >= 10


def test_a_dying_measuring_process_is_reported():
    x = torch.randn(2, 16)
    job = LatencyJob(program=b"not a program", reference=program_bytes(TinyMLP(), x),
                     example=x, scheme="fp32")
    with pytest.raises(Exception, match="zip|archive|file") as info:
        run_isolated(job)
    assert not isinstance(info.value, MeasurementError)  # the child's own exception


def test_a_timeout_is_a_measurement_error():
    x = torch.randn(2, 16)
    job = _job(TinyMLP(), TinyMLP(), x)
    with pytest.raises(MeasurementError, match="longer than"):
        run_isolated(job, timeout_s=0.01)


# a measuring process that hangs, having started a process of its own; writes both ids
HANG = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[1], "w").write(f"{child.pid}")
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def hanging(tmp_path, monkeypatch):
    """Measuring processes hang, with a time-out of 3 s; yields the file naming the
    process the hung one started."""
    from paretoslim.evaluators import _job as job_module

    started = tmp_path / "started"
    monkeypatch.setattr(job_module, "_child_command",
                        lambda job_path, out_path: [sys.executable, "-c", HANG, str(started)])
    monkeypatch.setattr(job_module, "job_timeout", lambda job: 3.0)
    return started


def test_a_hung_measuring_process_is_killed_with_what_it_started(hanging):
    x = torch.randn(2, 16)
    begun = time.monotonic()
    with pytest.raises(MeasurementError, match=r"longer than 3 s \(its time-out, from the "
                                               r"timing settings\) and was killed"):
        run_isolated(_job(TinyMLP(), TinyMLP(), x))
    assert time.monotonic() - begun < 30
    assert not _alive(int(hanging.read_text()))


def test_a_cancelled_measurement_ends_its_process_at_once(hanging):
    import threading

    from paretoslim.evaluators import MeasurementCancelled

    job, cancel = _job(TinyMLP(), TinyMLP(), torch.randn(2, 16)), threading.Event()
    threading.Timer(0.5, cancel.set).start()
    begun = time.monotonic()
    with pytest.raises(MeasurementCancelled):
        run_isolated(job, timeout_s=600.0, cancel=cancel)
    assert time.monotonic() - begun < 60  # long before its time-out
    assert not _alive(int(hanging.read_text()))


def test_a_hung_measurement_fails_its_trial_with_the_reason(hanging, mlp_task):
    from paretoslim.search import LatencySpec, TrialSettings, measure_baseline, run_trial
    from paretoslim.spaces import Recipe

    settings = TrialSettings(latency=LatencySpec(min_calls=20, min_seconds=0.0))
    result = run_trial(mlp_task, Recipe(), settings, measure_baseline(mlp_task))
    assert result.failure.startswith("latency: MeasurementError: the measuring process took "
                                     "longer than 3 s")
    assert not _alive(int(hanging.read_text()))


def test_the_measuring_time_out_follows_the_timing_settings():
    from paretoslim.evaluators._job import job_timeout

    x = torch.randn(2, 16)
    base = LatencyJob(program=b"", reference=b"", example=x, scheme="fp32")
    default = job_timeout(base)
    assert default >= 20 * 60  # generous: compiling and timing both allowed for
    more_calls = job_timeout(LatencyJob(**{**base.__dict__, "min_calls": 3000}))
    longer = job_timeout(LatencyJob(**{**base.__dict__, "min_seconds": 300.0}))
    sparse = job_timeout(LatencyJob(**{**base.__dict__, "sparse_program": b""}))
    assert more_calls > default and longer > default and sparse > default


def _pruned_mlp(sparsity: float) -> nn.Module:
    from paretoslim.spaces import sparsify

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 4)).eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            w = layer.weight
            w[w.abs() <= w.abs().flatten().kthvalue(int(sparsity * w.numel())).values] = 0
    assert sparsify(model, blocksize=1) and sparsify(model, blocksize=1) == []
    return model


@pytest.mark.parametrize("blocksize", [1, 4])
def test_sparse_execution_equals_dense(blocksize):
    from paretoslim.kernels import sparse_execution, sparse_layers
    from paretoslim.spaces import densify, sparsify

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    with torch.no_grad():
        model[0].weight[torch.rand_like(model[0].weight) < 0.9] = 0
    sparsify(model, blocksize=blocksize)
    dense = densify(copy.deepcopy(model))
    assert sparse_layers(model) == ["0"]
    fast = sparse_execution(model)
    assert "SparseMatmul" in type(fast[0]).__name__ and model[0] is not fast[0]
    x = torch.randn(5, 3, 32)  # leading dimensions are kept
    with torch.no_grad():
        torch.testing.assert_close(fast(x), dense(x), rtol=1e-5, atol=1e-5)
    assert sparse_execution(dense) is None


def test_job_keeps_the_faster_of_sparse_and_dense_execution():
    from paretoslim.kernels import sparse_execution

    model, teacher, x = _pruned_mlp(0.95), TinyMLP(64, 256, 4).eval(), torch.randn(16, 64)
    job = LatencyJob(program=program_bytes(model, x), reference=program_bytes(teacher, x),
                     example=x, scheme="fp32", min_calls=40, min_seconds=0.0,
                     sparse_program=program_bytes(sparse_execution(model), x))
    report = run_isolated(job)
    assert report.sparse_execution in ("sparse", "densified")
    assert (report.sparse_execution == "sparse") == (report.sparse_speedup > 1)
    assert report.metrics()["sparse_execution"] == report.sparse_execution
    assert report.max_relative_error <= 1e-3


def test_trial_job_times_sparse_layers_dense_or_through_sparse_mm():
    import io

    from _tiny import tiny_task

    from paretoslim.search import Baseline, LatencySpec
    from paretoslim.search._measuring import latency_job

    task = tiny_task("mlp")
    model = _pruned_mlp(0.9)
    task.model = TinyMLP(64, 256, 4).eval()
    task.example_input = torch.randn(4, 64)
    job = latency_job(task, model, "fp32", LatencySpec(), Baseline(0.9, 1.0, 1))

    def targets(data):
        graph = torch.export.load(io.BytesIO(data)).graph
        return {str(n.target) for n in graph.nodes if n.op == "call_function"}

    assert not any("searchsorted" in t for t in targets(job.program))  # plain dense weights
    assert any("sparse_linear" in t for t in targets(job.sparse_program))


@pytest.mark.parametrize("recorded", ["sparse", "densified"])
def test_export_writes_the_execution_that_was_measured(tmp_path, recorded):
    from paretoslim.search._export import _as_measured, _exported, load_program

    model = _pruned_mlp(0.9)
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = model(x)
    deployable, execution = _as_measured(model, {"sparse_execution": recorded})
    assert execution == recorded
    torch.export.save(_exported(deployable, x)[0], str(tmp_path / "model.pt2"))
    loaded = load_program(tmp_path / "model.pt2")  # safe loading knows the sparse operator
    targets = {str(n.target) for n in loaded.graph.nodes if n.op == "call_function"}
    assert any("sparse_linear" in t for t in targets) == (recorded == "sparse")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)


def test_stored_weight_forms_are_timed_decoded():
    import io

    from _tiny import tiny_task

    from paretoslim.search import Baseline, LatencySpec
    from paretoslim.search._measuring import latency_job
    from paretoslim.spaces import StoredWeight, densify
    from paretoslim.spaces._cluster import cluster_weights

    model = TinyMLP(64, 256, 4).eval()
    assert cluster_weights(model, 4)
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = model(x)
        decoded = densify(copy.deepcopy(model))
        assert not any(isinstance(m, StoredWeight) for m in decoded.modules())
        torch.testing.assert_close(decoded(x), expected, rtol=0, atol=0)

    task = tiny_task("mlp")
    task.model, task.example_input = TinyMLP(64, 256, 4).eval(), x
    job = latency_job(task, model, "fp32", LatencySpec(), Baseline(0.9, 1.0, 1))
    graph = torch.export.load(io.BytesIO(job.program)).graph
    ops = {str(n.target) for n in graph.nodes if n.op == "call_function"}
    assert not any("shift" in op or "bitwise" in op for op in ops)  # no unpacking per call
    assert job.sparse_program is None
