"""Latency harness: fixed threads, warm-up, interleaved blocks, median and spread."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class LatencyStats:
    """Per-call latency of one callable, in milliseconds."""

    median_ms: float
    iqr_ms: float
    cov: float
    calls: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _stats(samples: list[float]) -> LatencyStats:
    q = statistics.quantiles(samples, n=4)
    median = statistics.median(samples)
    mean = statistics.fmean(samples)
    cov = statistics.pstdev(samples) / mean if mean > 0 else 0.0
    return LatencyStats(median * 1e3, (q[2] - q[0]) * 1e3, cov, len(samples))


def time_interleaved(fns: dict[str, Callable[[torch.Tensor], object]], example: torch.Tensor,
                     *, threads: int = 1, warmup: int = 10, block: int = 20,
                     min_calls: int = 300, min_seconds: float = 1.0,
                     max_seconds: float = 60.0) -> dict[str, LatencyStats]:
    """Time each callable on ``example`` in alternating blocks of ``block`` calls.

    Alternating blocks make ratios between the callables robust to the machine's drift
    while keeping each callable's own cache state. Stops once every callable has at least
    ``min_calls`` calls and ``min_seconds`` of total time, or after ``max_seconds``.
    Runs under ``torch.no_grad`` with ``threads`` threads.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    spent = dict.fromkeys(fns, 0.0)
    clock = time.perf_counter
    with torch_threads(threads), torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn(example)
        start = clock()
        while True:
            for name, fn in fns.items():
                record = samples[name]
                for _ in range(block):
                    t0 = clock()
                    fn(example)
                    dt = clock() - t0
                    record.append(dt)
                    spent[name] += dt
            done = all(len(samples[n]) >= min_calls and spent[n] >= min_seconds for n in fns)
            if done or clock() - start > max_seconds:
                break
    return {name: _stats(record) for name, record in samples.items()}
