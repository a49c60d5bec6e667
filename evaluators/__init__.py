"""How good a compressed model is: quality, size and latency measured on the real artifact."""

from ._job import (
    LatencyJob,
    LatencyReport,
    MeasurementError,
    program_bytes,
    run_isolated,
    run_latency_job,
)
from ._latency import (
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
    "LatencyJob",
    "LatencyReport",
    "LatencyStats",
    "MeasurementError",
    "SpeedupMeasurement",
    "accuracy",
    "deployed_tensors",
    "graph_reads",
    "measure_speedup",
    "measurement_lock",
    "program_bytes",
    "run_isolated",
    "run_latency_job",
    "serialized_size_bytes",
    "size_mb",
    "time_interleaved",
    "torch_threads",
]
