"""Latency harness: fixed threads, warm-up, interleaved blocks, median and spread."""

from __future__ import annotations

import contextlib
import dataclasses
import math
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
                     enough: Callable[[dict[str, list[float]], int], bool] | None = None,
                     ) -> dict[str, LatencyStats]:
    """Time each callable on ``example`` (passed as ``model_io.call`` passes inputs) in
    alternating blocks of ``block`` calls.

    Alternating blocks make ratios between the callables robust to the machine's drift
    while keeping each callable's own cache state. Stops once every callable has at least
    ``min_calls`` calls and ``min_seconds`` of total time, or after ``max_seconds``.
    Runs under ``torch.no_grad`` with ``threads`` threads, holding the machine's
    measurement lock. ``block_medians``, when given, receives each block's median per name,
    in seconds. ``enough(block_medians, rounds)``, asked after each round from the
    ``MIN_ROUNDS``-th on, may end the timing early; ``rounds`` is how many rounds the
    calls and seconds above would take at the pace so far.
    """
    with measurement_lock():
        return _time_interleaved(fns, example, threads, warmup, block, min_calls,
                                 min_seconds, max_seconds, block_medians, enough)


_clock = time.perf_counter  # the timer of every measurement (a seam for the tests)
MIN_ROUNDS = 5  # rounds of blocks before a timing may end early


def _rounds_needed(samples: dict[str, list[float]], spent: dict[str, float], block: int,
                   min_calls: int, min_seconds: float) -> int:
    """The rounds after which every callable would have ``min_calls`` calls and
    ``min_seconds`` of time, at its mean call time so far."""
    calls = max(max(min_calls, math.ceil(min_seconds * len(samples[n]) / max(spent[n], 1e-12)))
                for n in samples)
    return math.ceil(calls / block)


def _time_interleaved(fns, example, threads, warmup, block, min_calls, min_seconds,
                      max_seconds, block_medians, enough) -> dict[str, LatencyStats]:
    samples: dict[str, list[float]] = {name: [] for name in fns}
    medians: dict[str, list[float]] = {} if block_medians is None else block_medians
    spent = dict.fromkeys(fns, 0.0)
    clock = _clock
    bound = {name: _bound(fn, example) for name, fn in fns.items()}
    with torch_threads(threads), torch.no_grad():
        for fn in bound.values():
            for _ in range(warmup):
                fn()
        start, rounds = clock(), 0
        while True:
            rounds += 1
            for name, fn in bound.items():
                record = samples[name]
                for _ in range(block):
                    t0 = clock()
                    fn()
                    dt = clock() - t0
                    record.append(dt)
                    spent[name] += dt
                medians.setdefault(name, []).append(statistics.median(record[-block:]))
            done = all(len(samples[n]) >= min_calls and spent[n] >= min_seconds for n in fns)
            if done or clock() - start > max_seconds:
                break
            if enough is not None and rounds >= MIN_ROUNDS and enough(
                    medians, _rounds_needed(samples, spent, block, min_calls, min_seconds)):
                break
    return {name: _stats(record) for name, record in samples.items()}


LOCK_ENV = "PARETOSLIM_LOCK_DIR"


def _lock_dir() -> Path:
    directory = Path(os.environ.get(LOCK_ENV) or tempfile.gettempdir())
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@contextlib.contextmanager
def measurement_lock() -> Iterator[None]:
    """Hold this machine's latency lock: timings of concurrent trials never overlap, and
    work in a ``ComputeShare`` (e.g. a fine-tune) waits at its next pause point.

    The lock files live in ``$PARETOSLIM_LOCK_DIR`` or the system's temporary directory,
    shared by every paretoslim process on the machine.
    """
    from filelock import FileLock

    directory = _lock_dir()
    with FileLock(str(directory / "paretoslim-latency.lock")):
        with _flock(directory / _GATE, exclusive=True), \
                _flock(directory / _COMPUTE, exclusive=True):
            yield


_GATE, _COMPUTE = "paretoslim-gate.lock", "paretoslim-compute.lock"


@contextlib.contextmanager
def _flock(path: Path, *, exclusive: bool) -> Iterator[None]:
    """An advisory lock on ``path`` (blocking; none where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


class ComputeShare:
    """Work of this process that must not run while the machine times a model.

    Between two ``pause_point()`` calls the work holds a shared lock that
    ``measurement_lock`` waits for; at a pause point it lets a waiting timing go first
    (a turnstile, so a timing is never starved by work that pauses often). ``release()``
    before blocking on a measurement, or when the work ends: a measurement that waits for
    its own caller's share would wait forever.
    """

    def __init__(self) -> None:
        self._held: contextlib.ExitStack | None = None

    def pause_point(self) -> None:
        self.release()
        directory, held = _lock_dir(), contextlib.ExitStack()
        with _flock(directory / _GATE, exclusive=False):
            held.enter_context(_flock(directory / _COMPUTE, exclusive=False))
        self._held = held

    def release(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None


@dataclass(frozen=True)
class SpeedupMeasurement:
    """A model and its baseline timed side by side, and how much to trust the ratio."""

    model: LatencyStats
    baseline: LatencyStats
    speedup: float
    speedup_spread: float
    attempts: int
    noisy: bool
    speedup_low: float = float("nan")  # the 95% confidence interval of ``speedup``
    speedup_high: float = float("nan")


def _bound(fn: Callable, example: model_io.Inputs) -> Callable[[], object]:
    """``fn`` applied to ``example`` as a call without arguments (no dispatch when timed)."""
    args, kwargs = model_io.export_arguments(example)
    return partial(fn, *args, **kwargs)


def measure_speedup(model: Callable, baseline: Callable, example: model_io.Inputs, *,
                    threads: int = 1, min_calls: int = 300, min_seconds: float = 1.0,
                    max_spread: float = 0.05, attempts: int = 2,
                    stop_when_steady: bool = True) -> SpeedupMeasurement:
    """Time ``model`` against ``baseline`` interleaved; re-measure when the ratio is unstable.

    ``speedup`` is baseline median / model median over all calls. ``speedup_spread`` is the
    relative interquartile range of the per-round ratios (baseline block median / model
    block median). Above ``max_spread`` the pair is measured again, up to ``attempts``
    times in all, keeping the steadiest attempt; ``noisy`` says the last word was still
    above the limit. With ``stop_when_steady``, an attempt ends as soon as its ratio is
    known as precisely as ``min_calls`` and ``min_seconds`` would give it at a spread of
    ``max_spread`` (``steady_enough``): fewer calls on a quiet machine.
    """
    tries: list[SpeedupMeasurement] = []
    for _ in range(attempts):
        blocks: dict[str, list[float]] = {}
        stats = time_interleaved(
            {"model": model, "baseline": baseline}, example, threads=threads,
            min_calls=min_calls, min_seconds=min_seconds, block_medians=blocks,
            enough=partial(steady_enough, max_spread=max_spread) if stop_when_steady else None)
        ratios = _round_ratios(blocks)
        spread = _relative_iqr(ratios)
        speedup = stats["baseline"].median_ms / stats["model"].median_ms
        low, high = median_interval(ratios)
        tries.append(SpeedupMeasurement(
            stats["model"], stats["baseline"], speedup, spread, 0, spread > max_spread,
            speedup * low, speedup * high))
        if spread <= max_spread:
            break
    steadiest = min(tries, key=lambda m: m.speedup_spread)
    return dataclasses.replace(steadiest, attempts=len(tries))


def steady_enough(blocks: dict[str, list[float]], rounds: int, *, max_spread: float) -> bool:
    """Whether the per-round ratios so far pin the speedup down as well as ``rounds``
    rounds at a spread of ``max_spread`` would: the median's error falls as the spread over
    the square root of the rounds, so k rounds suffice at a spread of
    ``max_spread * sqrt(k / rounds)`` (a quarter of the rounds at half the spread)."""
    ratios = _round_ratios(blocks)
    return bool(ratios) and _relative_iqr(ratios) <= max_spread * math.sqrt(
        len(ratios) / max(rounds, 1))


def median_interval(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """The distribution-free 95% confidence interval of the median of ``values`` (order
    statistics of the binomial), relative to that median: ``(low, high)`` factors; NaN
    with fewer than 6 values, too few to bound it."""
    n = len(values)
    if n < 6:
        return float("nan"), float("nan")
    ordered, middle = sorted(values), statistics.median(values)
    half = z * math.sqrt(n) / 2
    low, high = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half) - 1)
    return ordered[low] / middle, ordered[high] / middle


def _round_ratios(blocks: dict[str, list[float]]) -> list[float]:
    """Baseline block median over model block median, round by round."""
    return [b / m for b, m in zip(blocks["baseline"], blocks["model"], strict=True) if m > 0]


def _relative_iqr(values: list[float]) -> float:
    if len(values) < 4:
        return 0.0 if len(values) < 2 else (max(values) - min(values)) / statistics.median(
            values)
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / statistics.median(values)
