"""Latency harness: fixed threads, warm-up, interleaved blocks, median and spread."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from ..spaces import model_io


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


def time_interleaved(fns: dict[str, Callable], example: model_io.Inputs,
                     *, threads: int = 1, warmup: int = 10, block: int = 20,
                     min_calls: int = 300, min_seconds: float = 1.0,
                     max_seconds: float = 60.0,
                     block_medians: dict[str, list[float]] | None = None,
                     ) -> dict[str, LatencyStats]:
    """Time each callable on ``example`` (passed as ``model_io.call`` passes inputs) in
    alternating blocks of ``block`` calls.

    Alternating blocks make ratios between the callables robust to the machine's drift
    while keeping each callable's own cache state. Stops once every callable has at least
    ``min_calls`` calls and ``min_seconds`` of total time, or after ``max_seconds``.
    Runs under ``torch.no_grad`` with ``threads`` threads, holding the machine's
    measurement lock. ``block_medians``, when given, receives each block's median per name,
    in seconds.
    """
    with measurement_lock():
        return _time_interleaved(fns, example, threads, warmup, block, min_calls,
                                 min_seconds, max_seconds, block_medians)


_clock = time.perf_counter  # the timer of every measurement (a seam for the tests)


def _time_interleaved(fns, example, threads, warmup, block, min_calls, min_seconds,
                      max_seconds, block_medians) -> dict[str, LatencyStats]:
    samples: dict[str, list[float]] = {name: [] for name in fns}
    spent = dict.fromkeys(fns, 0.0)
    clock = _clock
    bound = {name: _bound(fn, example) for name, fn in fns.items()}
    with torch_threads(threads), torch.no_grad():
        for fn in bound.values():
            for _ in range(warmup):
                fn()
        start = clock()
        while True:
            for name, fn in bound.items():
                record = samples[name]
                for _ in range(block):
                    t0 = clock()
                    fn()
                    dt = clock() - t0
                    record.append(dt)
                    spent[name] += dt
                if block_medians is not None:
                    block_medians.setdefault(name, []).append(
                        statistics.median(record[-block:]))
            done = all(len(samples[n]) >= min_calls and spent[n] >= min_seconds for n in fns)
            if done or clock() - start > max_seconds:
                break
    return {name: _stats(record) for name, record in samples.items()}


LOCK_ENV = "PARETOSLIM_LOCK_DIR"


@contextlib.contextmanager
def measurement_lock() -> Iterator[None]:
    """Hold this machine's latency lock: timings of concurrent trials never overlap.

    The lock file lives in ``$PARETOSLIM_LOCK_DIR`` or the system's temporary directory,
    shared by every paretoslim process on the machine.
    """
    from filelock import FileLock

    directory = Path(os.environ.get(LOCK_ENV) or tempfile.gettempdir())
    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory / "paretoslim-latency.lock")):
        yield


@dataclass(frozen=True)
class SpeedupMeasurement:
    """A model and its baseline timed side by side, and how much to trust the ratio."""

    model: LatencyStats
    baseline: LatencyStats
    speedup: float
    speedup_spread: float
    attempts: int
    noisy: bool


def _bound(fn: Callable, example: model_io.Inputs) -> Callable[[], object]:
    """``fn`` applied to ``example`` as a call without arguments (no dispatch when timed)."""
    args, kwargs = model_io.export_arguments(example)
    return partial(fn, *args, **kwargs)


def measure_speedup(model: Callable, baseline: Callable, example: model_io.Inputs, *,
                    threads: int = 1, min_calls: int = 300, min_seconds: float = 1.0,
                    max_spread: float = 0.05, attempts: int = 2) -> SpeedupMeasurement:
    """Time ``model`` against ``baseline`` interleaved; re-measure when the ratio is unstable.

    ``speedup`` is baseline median / model median over all calls. ``speedup_spread`` is the
    relative interquartile range of the per-round ratios (baseline block median / model
    block median). Above ``max_spread`` the pair is measured again, up to ``attempts``
    times in all, keeping the steadiest attempt; ``noisy`` says the last word was still
    above the limit.
    """
    tries: list[SpeedupMeasurement] = []
    for _ in range(attempts):
        blocks: dict[str, list[float]] = {}
        stats = time_interleaved({"model": model, "baseline": baseline}, example,
                                 threads=threads, min_calls=min_calls,
                                 min_seconds=min_seconds, block_medians=blocks)
        ratios = [b / m for b, m in zip(blocks["baseline"], blocks["model"], strict=True)
                  if m > 0]
        spread = _relative_iqr(ratios)
        tries.append(SpeedupMeasurement(
            stats["model"], stats["baseline"],
            stats["baseline"].median_ms / stats["model"].median_ms, spread, 0,
            spread > max_spread))
        if spread <= max_spread:
            break
    steadiest = min(tries, key=lambda m: m.speedup_spread)
    return dataclasses.replace(steadiest, attempts=len(tries))


def _relative_iqr(values: list[float]) -> float:
    if len(values) < 4:
        return 0.0 if len(values) < 2 else (max(values) - min(values)) / statistics.median(
            values)
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / statistics.median(values)
