"""How good a compressed model is: quality, size and latency measured on the real artifact."""

if "." not in __name__:  # this folder, imported by its own name from a checkout on sys.path
    from paretoslim.spaces._aside import step_aside

    __package__ = step_aside(__name__, __path__[0])

from ._bench import BenchRow, render_bench, run_kernel_bench
from ._job import (
    CACHE_ENV,
    LATENCY_FIGURES,
    LatencyJob,
    LatencyReport,
    MeasurementCancelled,
    MeasurementError,
    cache_dir,
    program_bytes,
    run_isolated,
    run_latency_job,
)
from ._latency import (
    ComputeShare,
    LatencyStats,
    SpeedupMeasurement,
    measure_speedup,
    measurement_lock,
    time_interleaved,
    torch_threads,
)
from ._quality import accuracy
from ._size import deployed_tensors, graph_reads, serialized_size_bytes, size_mb

__all__ = [
    "BenchRow",
    "CACHE_ENV",
    "ComputeShare",
    "LatencyJob",
    "LATENCY_FIGURES",
    "LatencyReport",
    "LatencyStats",
    "MeasurementCancelled",
    "MeasurementError",
    "SpeedupMeasurement",
    "accuracy",
    "cache_dir",
    "deployed_tensors",
    "graph_reads",
    "measure_speedup",
    "measurement_lock",
    "program_bytes",
    "render_bench",
    "run_kernel_bench",
    "run_isolated",
    "run_latency_job",
    "serialized_size_bytes",
    "size_mb",
    "time_interleaved",
    "torch_threads",
]
