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
    save_json,
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
from ._latency_model import (
    FORMATS,
    OTHER,
    POOLS,
    Correction,
    ErrorReport,
    LatencyModel,
    LayerCall,
    error_summary,
    layer_calls,
    target_key,
)
from ._layer_kernels import LayerTimingJob, time_layer_calls
from ._quality import accuracy
from ._size import (
    deployed_tensors,
    estimated_size_mb,
    graph_reads,
    serialized_size_bytes,
    size_mb,
)

__all__ = [
    "BenchRow",
    "CACHE_ENV",
    "ComputeShare",
    "Correction",
    "ErrorReport",
    "FORMATS",
    "OTHER",
    "POOLS",
    "LatencyJob",
    "LatencyModel",
    "LayerCall",
    "LayerTimingJob",
    "LATENCY_FIGURES",
    "LatencyReport",
    "LatencyStats",
    "MeasurementCancelled",
    "MeasurementError",
    "SpeedupMeasurement",
    "accuracy",
    "cache_dir",
    "save_json",
    "deployed_tensors",
    "estimated_size_mb",
    "error_summary",
    "layer_calls",
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
    "target_key",
    "time_interleaved",
    "time_layer_calls",
    "torch_threads",
]
