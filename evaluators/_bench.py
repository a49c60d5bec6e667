"""Kernel benchmark (``paretoslim bench kernels``): GOP/s of each GEMM path on this CPU against
the ceiling of the ISA it dispatches to, timed with the trials' latency harness."""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

from ..kernels import Target, detect_target
from ._ceiling import OPS_PER_CYCLE, Ceiling, measure_ceiling
from ._gemm import GEMM_PATHS, LOWRANK_PATH, build_case, case_error, dispatch
from ._latency import time_interleaved, torch_threads


@dataclass(frozen=True)
class BenchRow:
    """One timed case.

    ``gops`` counts 2*m*n*k per GEMM (``flop_basis``: "dense-equivalent" for sparse rows,
    FLOPs executed otherwise); ``executed_gops`` counts what runs (2*m*nonzeros for sparse).
    ``peak_gops`` is the ceiling of ``isa`` on ``min(threads, cores)`` cores: the measured
    instruction rate (``peak_source`` "measured"), else the per-cycle rate of the detected
    ``microarchitecture`` at ``clock_ghz`` ("table:zen4", ...), as ``assumption`` states;
    ``fraction_of_peak`` is ``executed_gops / peak_gops``. ``max_rel_error`` is against fp32
    ``F.linear`` with the weight the path represents (masked if sparse, ``U @ V`` if low rank).
    """

    name: str
    group: str
    m: int
    k: int
    n: int
    threads: int
    dtype: str
    gops: float
    executed_gops: float
    peak_gops: float
    fraction_of_peak: float
    peak_source: str
    speedup_vs_fp32: float | None
    isa: str
    kernel: str
    median_ms: float
    calls: int
    max_rel_error: float
    flop_basis: str = "executed"
    sparsity: float | None = None
    block: int | None = None
    rank: int | None = None
    probe_gops: float | None = None
    clock_ghz: float = 0.0
    microarchitecture: str = ""
    assumption: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Plan:
    gemm_shapes: tuple[tuple[int, int, int], ...]
    sparse_shapes: tuple[tuple[int, int, int], ...]
    sparsities: tuple[float, ...]
    blocks: tuple[int, ...]
    lowrank_shape: tuple[int, int, int]
    ranks: tuple[int, ...]
    timing: dict


_FULL = _Plan(
    gemm_shapes=((1024, 1024, 1024), (64, 1024, 4096), (64, 4096, 1024), (1, 1024, 1024)),
    sparse_shapes=((64, 1024, 4096), (1024, 1024, 1024)),
    sparsities=(0.5, 0.75, 0.9, 0.95, 0.99),
    blocks=(16, 32),
    lowrank_shape=(64, 1024, 1024),
    ranks=(64, 128, 256, 512, 768),
    timing={"warmup": 10, "block": 10, "min_calls": 200, "min_seconds": 1.0, "max_seconds": 10.0},
)
_QUICK = _Plan(
    gemm_shapes=((32, 256, 128),),
    sparse_shapes=((32, 256, 128),),
    sparsities=(0.9,),
    blocks=(16, 32),
    lowrank_shape=(32, 128, 128),
    ranks=(16, 128),
    timing={"warmup": 2, "block": 5, "min_calls": 5, "min_seconds": 0.01, "max_seconds": 2.0},
)


def _masked(weight: torch.Tensor, sparsity: float, block: int | None,
            gen: torch.Generator) -> torch.Tensor:
    """Zero a ``sparsity`` fraction of ``weight``: elements at random, or whole blocks."""
    n, k = weight.shape
    if block is None:
        return weight * (torch.rand(n, k, generator=gen) >= sparsity)
    keep = torch.rand(n // block, k // block, generator=gen) >= sparsity
    return weight * keep.repeat_interleave(block, 0).repeat_interleave(block, 1)


def _groups(plan: _Plan, gen: torch.Generator) -> Iterator[tuple]:
    """(group, x, dense weight, cases) in run order; a case is (path, weight, flops, extra)."""

    def data(m: int, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen) / k**0.5

    for m, k, n in plan.gemm_shapes:
        x, weight = data(m, k, n)
        yield "gemm", x, weight, [(p, weight, 2 * m * n * k, {}) for p in GEMM_PATHS[1:]]

    def sparse_cases(m: int, k: int, n: int, weight: torch.Tensor) -> Iterator[tuple]:
        for sparsity in plan.sparsities:  # masks made one at a time: weights can be large
            yield ("sparse_csr", _masked(weight, sparsity, None, gen), 2 * m * n * k,
                   {"sparsity": sparsity})
            for block in plan.blocks:
                yield ("sparse_bsr", _masked(weight, sparsity, block, gen), 2 * m * n * k,
                       {"sparsity": sparsity, "block": block})

    for m, k, n in plan.sparse_shapes:
        x, weight = data(m, k, n)
        yield "sparse", x, weight, sparse_cases(m, k, n, weight)
    m, k, n = plan.lowrank_shape
    x, weight = data(m, k, n)
    yield "lowrank", x, weight, [(LOWRANK_PATH, weight, 2 * m * r * (k + n), {"rank": r})
                                 for r in plan.ranks]


@dataclass(frozen=True)
class _Run:
    """What every case of one benchmark run shares."""

    threads: int
    cores: int
    target: Target
    ceiling: Ceiling
    timing: dict
    log: Callable[[str], None]


def _measure(run: _Run, path: str, group: str, weight: torch.Tensor, x: torch.Tensor,
             flops: float, baseline_ms: float | None, **extra) -> BenchRow | None:
    """Build, check, and time one case; None (with a message) when it cannot run."""
    try:
        with torch_threads(run.threads):
            case = build_case(path, weight, x, block=extra.get("block"), rank=extra.get("rank"))
            error = case_error(case, x)
            isa, kernel = dispatch(case, run.target)
            if ":ref" in kernel:  # oneDNN's scalar reference code: not a real path, slow
                raise RuntimeError(f"dispatches to a reference kernel ({kernel})")
            stats = time_interleaved({path: case.fn}, case.arg, threads=run.threads,
                                     **run.timing)[path]
    except Exception as exc:  # noqa: BLE001 - report and go on with the other paths
        run.log(f"  skipped {path} {extra or ''}: {type(exc).__name__}: {exc}")
        return None
    finally:
        torch._dynamo.reset()
    m, k, n = x.shape[0], x.shape[1], weight.shape[0]
    seconds = stats.median_ms * 1e-3
    sparse = path.startswith("sparse")
    executed = 2 * m * int(torch.count_nonzero(weight)) if sparse else flops
    per_core, source = run.ceiling.per_core(isa)
    peak_gops = run.cores * per_core
    probe = run.ceiling.probe_gops.get(isa)
    row = BenchRow(
        name=path if path != "sparse_bsr" else f"sparse_bsr{extra['block']}", group=group,
        m=m, k=k, n=n, threads=run.threads, dtype=case.dtype, gops=flops / seconds / 1e9,
        executed_gops=executed / seconds / 1e9, peak_gops=peak_gops,
        fraction_of_peak=executed / seconds / 1e9 / peak_gops if peak_gops > 0 else math.nan,
        peak_source=source,
        speedup_vs_fp32=1.0 if path == "fp32_eager" else (
            baseline_ms / stats.median_ms if baseline_ms else None),
        isa=isa, kernel=kernel, median_ms=stats.median_ms, calls=stats.calls,
        max_rel_error=error, flop_basis="dense-equivalent" if sparse else "executed",
        probe_gops=None if probe is None else probe * run.cores,
        clock_ghz=run.ceiling.clock_ghz, microarchitecture=run.ceiling.uarch.name,
        assumption=run.ceiling.describe(isa, run.cores), **extra)
    run.log(f"  {row.name:24s} {m}x{k}x{n} {_extra(row):10s} {row.gops:9.1f} GOP/s "
            f"{row.fraction_of_peak:6.1%} of {isa} peak ({source})  {kernel}")
    return row


def run_kernel_bench(*, threads: int = 1, quick: bool = False,
                     progress: bool = True) -> list[BenchRow]:
    """Time every path (dense GEMM shapes, sparse, low rank) with ``threads`` threads.

    Each case gets a warm-up and a median over at least ``min_calls`` calls and one second
    (``quick``: tiny shapes and a few calls, for tests). Speedups are against ``fp32_eager``
    on the same shape, timed in the same group. A path that fails to build is skipped with a
    message on stderr.
    """
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"The 'threads' parameter of run_kernel_bench must be an int >= 1. "
                         f"Got {threads!r} instead.")
    plan = _QUICK if quick else _FULL
    ceiling = measure_ceiling()

    def log(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)

    target = detect_target()
    run = _Run(threads, min(threads, target.cores), target, ceiling, plan.timing, log)
    log(f"{ceiling.cpu} ({ceiling.uarch.name}: {ceiling.uarch.basis}): clock "
        f"{ceiling.clock_ghz:.2f} GHz ({ceiling.clock_source}); measured ceilings "
        + (", ".join(f"{k} {v:.0f}" for k, v in ceiling.probe_gops.items()) or "none")
        + " GOP/s per core")
    rows: list[BenchRow | None] = []
    for group, x, weight, cases in _groups(plan, torch.Generator().manual_seed(0)):
        m, k, n = x.shape[0], x.shape[1], weight.shape[0]
        base = _measure(run, "fp32_eager", group, weight, x, 2 * m * n * k, None,
                        **({"sparsity": 0.0} if group == "sparse" else {}))
        rows.append(base)
        for path, path_weight, flops, extra in cases:
            rows.append(_measure(run, path, group, path_weight, x, flops,
                                 base.median_ms if base else None, **extra))
    return [row for row in rows if row is not None]


def _extra(row: BenchRow) -> str:
    if row.rank is not None:
        return f"r={row.rank}"
    if row.sparsity is not None:
        return f"s={row.sparsity:.0%}" + (f" b{row.block}" if row.block else "")
    return ""


def break_even(rows: list[BenchRow]) -> dict[str, float | str]:
    """Sparsity (sparse rows) or rank (low rank) where the speedup over dense fp32 crosses 1,
    interpolated on log(speedup) between the measured points, per path and shape."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        knob = r.sparsity if r.name.startswith("sparse") else r.rank
        if knob is not None and r.speedup_vs_fp32 and r.name != "fp32_eager":
            key = f"{r.name} {r.m}x{r.k}x{r.n}"
            series.setdefault(key, []).append((float(knob), r.speedup_vs_fp32))
    out: dict[str, float | str] = {}
    for key, points in series.items():
        points.sort()
        out[key] = f"not within {points[0][0]:g}-{points[-1][0]:g}"
        for (x0, s0), (x1, s1) in itertools.pairwise(points):
            if (s0 - 1) * (s1 - 1) <= 0 and s0 != s1:
                t = math.log(s0) / (math.log(s0) - math.log(s1))
                out[key] = x0 + t * (x1 - x0)
                break
    return out


def render_bench(rows: list[BenchRow], fmt: str) -> str:
    """Render rows as "table" (with each ceiling's source and assumption) or "json" (a list
    of row objects)."""
    if fmt == "json":
        return json.dumps([row.to_dict() for row in rows], indent=2)
    if fmt != "table":
        raise ValueError(f"Unknown format {fmt!r}; valid formats: ['table', 'json'].")
    header = (f"{'group':8s} {'path':24s} {'m x k x n':16s} {'case':9s} {'GOP/s':>9s} "
              f"{'peak':>7s} {'%peak':>6s} {'x fp32':>7s} {'err':>8s}  isa / kernel")
    lines = [header, "-" * len(header)]
    for r in rows:
        speedup = "" if r.speedup_vs_fp32 is None else f"{r.speedup_vs_fp32:.2f}"
        basis = "*" if r.flop_basis == "dense-equivalent" else " "
        lines.append(
            f"{r.group:8s} {r.name:24s} {f'{r.m}x{r.k}x{r.n}':16s} {_extra(r):9s} "
            f"{r.gops:8.1f}{basis} {r.peak_gops:7.0f} {r.fraction_of_peak:6.1%} {speedup:>7s} "
            f"{r.max_rel_error:8.1e}  {r.isa} / {r.kernel}")
    lines.append("* dense-equivalent GOP/s (2*m*n*k of the dense GEMM / time); %peak counts "
                 "the FLOPs executed (2*m*nonzeros); low rank counts the FLOPs executed.")
    for key, value in break_even(rows).items():
        shown = value if isinstance(value, str) else (
            f"{value:.0%} sparsity" if key.startswith("sparse") else f"rank {value:.0f}")
        lines.append(f"break-even vs dense fp32, {key}: {shown}")
    lines.extend(_ceiling_lines(rows))
    return "\n".join(lines)


def _ceiling_lines(rows: list[BenchRow]) -> list[str]:
    """Where each ISA's peak came from, and the table's per-core figures for comparison."""
    if not rows:
        return []
    lines = [f"{isa}: {r.peak_source}; {r.assumption}"
             for isa, r in {r.isa: r for r in rows}.items()]
    first = rows[0]
    table = OPS_PER_CYCLE[first.microarchitecture]
    per_core = ", ".join(f"{isa} {first.clock_ghz * ops:.0f}" for isa, ops in table.items())
    lines.append(f"table:{first.microarchitecture} at {first.clock_ghz:.2f} GHz, GOP/s per "
                 f"core: {per_core}")
    return lines
