"""Kernel benchmark: GOP/s of each GEMM path (fp32, bf16, int8, sparse, low rank) on this CPU,
against the peak of the ISA each path dispatches to (``paretoslim bench kernels``)."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import math
import mmap
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ..evaluators._latency import time_interleaved, torch_threads
from ._lower import TOLERANCE, relative_error
from ._target import Target, detect_target

# Dense paths, in table order. The first is the fp32 baseline every speedup is measured against.
GEMM_PATHS = (
    "fp32_eager",  # F.linear (MKL SGEMM)
    "fp32_onednn",  # mkldnn._linear_pointwise on a prepacked weight (oneDNN)
    "fp32_inductor",  # torch.compile, Inductor freezing (Inductor picks the kernel)
    "bf16_eager",  # F.linear in bf16 (oneDNN matmul)
    "bf16_inductor",  # bf16 Linear under torch.compile with freezing
    "int8_int_mm",  # torch._int_mm on int8 operands (int32 out), quantization not timed
    "int8_static_pt2e",  # torchao PT2E X86InductorQuantizer + Inductor freezing, fp32 in/out
    "int8_static_ao_x86",  # torch.ao quantized.Linear, x86 engine (fbgemm), quint8 in/out
    "int8_static_ao_onednn",  # same on the onednn engine
    "int8_dynamic_ao_x86",  # torch.ao quantized.dynamic.Linear, x86 engine, fp32 in/out
    "int8_dynamic_ao_onednn",  # same on the onednn engine
    "int8_dynamic_torchao",  # torchao Int8DynamicActivationInt8WeightConfig + torch.compile
)
SPARSE_PATHS = ("sparse_csr", "sparse_bsr")  # torch.sparse.mm(W_sparse, x.T)
LOWRANK_PATH = "lowrank_fp32"  # F.linear(F.linear(x, V), U), V: r x k, U: n x r

# Ops per cycle and core: FMA units x lanes x 2 for vector ISAs, documented tile rates for AMX.
OPS_PER_CYCLE = {
    "avx2": 32,
    "avx512": 64,
    "avx512_bf16": 128,
    "avx512_vnni": 256,
    "amx_bf16": 1024,
    "amx_int8": 2048,
}
_ISA_NOTE = {
    "avx2": "AVX2 fp32 FMA: 2 units x 8 lanes x 2",
    "avx512": "AVX-512 fp32 FMA: 2 units x 16 lanes x 2",
    "avx512_bf16": "AVX512-BF16 VDPBF16PS: 2x the fp32 FMA rate",
    "avx512_vnni": "AVX512-VNNI VPDPBUSD: 4x the fp32 FMA rate",
    "amx_bf16": "AMX TDPBF16PS: 16x16x32 tile per 16 cycles (documented)",
    "amx_int8": "AMX TDPBSSD: 16x16x64 tile per 16 cycles (documented)",
}

@dataclass(frozen=True)
class BenchRow:
    """One timed case. ``gops`` counts 2*m*n*k per GEMM (``flop_basis``: "dense-equivalent"
    for sparse rows, FLOPs executed otherwise); ``peak_gops`` is the peak of ``isa`` on
    ``min(threads, cores)`` cores at the measured clock; ``max_rel_error`` is against fp32
    ``F.linear`` with the weight the path represents (masked if sparse, ``U @ V`` if low rank)."""

    name: str
    group: str
    m: int
    k: int
    n: int
    threads: int
    dtype: str
    gops: float
    peak_gops: float
    fraction_of_peak: float
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
    assumption: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Case:
    """A path ready to time: ``fn(arg)``; ``to_float`` maps its output to ``x @ weight.T``."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    arg: torch.Tensor
    to_float: Callable[[torch.Tensor], torch.Tensor]
    weight: torch.Tensor
    dtype: str = "fp32"
    kernel: str = ""  # what runs when no verbose output names it


# --- peak: measured clock and instruction-throughput probes (x86-64 machine code) ---------

# 100 dependent `add rax, rcx` per iteration: one cycle each on every x86 core.
_ADD_CHAIN = (bytes.fromhex("4831c048c7c101000000") + bytes.fromhex("4801c8") * 100
              + bytes.fromhex("48ffcf0f85cbfeffffc3"))
# vpxord zmm0-15, zmm30, zmm31 (zero inputs: no denormal assists).
_ZERO_ZMM = bytes.fromhex(
    "62f17d48efc062f17548efc962f16d48efd262f16548efdb62f15d48efe462f15548efed62f14d48eff6"
    "62f14548efff62513d48efc062513548efc962512d48efd262512548efdb62511d48efe462511548efed"
    "62510d48eff662510548efff62010d40eff662010540efff"
)


def _zmm_loop(opcode: int, pp: int) -> bytes:
    """16 independent `op zmm_i, zmm30, zmm31` per iteration (EVEX, 0F38 map), then ret."""
    body = b"".join(bytes([0x62, 0x92 if r < 8 else 0x12, pp, 0x40, opcode, 0xC7 | (r & 7) << 3])
                    for r in range(16))
    return _ZERO_ZMM + body + bytes.fromhex("48ffcf759bc5f877c3")  # dec rdi; jnz; vzeroupper


def _amx_loop(vex2: int, opcode: int) -> bytes:
    """ldtilecfg [rsi]; tilezero tmm0-5; 4 independent `op tmm0-3, tmm4, tmm5`; tilerelease."""
    zero = b"".join(bytes([0xC4, 0xE2, 0x7B, 0x49, 0xC0 | t << 3]) for t in range(6))
    body = b"".join(bytes([0xC4, 0xE2, vex2, opcode, 0xC4 | t << 3]) for t in range(4))
    return (bytes.fromhex("c4e2784906") + zero + body
            + bytes.fromhex("48ffcf75e7c4e27849c0c3"))


# name: (machine code, ops per iteration, cpuinfo flag needed)
_PROBES = {
    "avx512": (_zmm_loop(0xB8, 0x0D), 16 * 16 * 2, "avx512f"),  # vfmadd231ps
    "avx512_vnni": (_zmm_loop(0x50, 0x0D), 16 * 64 * 2, "avx512_vnni"),  # vpdpbusd
    "avx512_bf16": (_zmm_loop(0x52, 0x0E), 16 * 32 * 2, "avx512_bf16"),  # vdpbf16ps
    "amx_bf16": (_amx_loop(0x52, 0x5C), 4 * 16 * 16 * 32 * 2, "amx_bf16"),  # tdpbf16ps
    "amx_int8": (_amx_loop(0x53, 0x5E), 4 * 16 * 16 * 64 * 2, "amx_int8"),  # tdpbssd
}


def _native(code: bytes) -> Callable[..., int]:
    """Map ``code`` executable; the returned function keeps the mapping alive."""
    page = mmap.mmap(-1, len(code), prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    proto = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p)
    fn = proto(ctypes.addressof(ctypes.c_char.from_buffer(page)))
    fn.page = page
    return fn


def _best_rate(fn: Callable[..., int], ops_per_iter: int, arg=None, seconds: float = 0.05,
               repeats: int = 7) -> float:
    """Highest ops/s over ``repeats`` runs of about ``seconds`` each (max: noise only slows)."""
    iters = 1000
    t0 = time.perf_counter()
    fn(iters, arg)
    iters = max(iters, int(iters * seconds / max(time.perf_counter() - t0, 1e-9)))
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(iters, arg)
        best = max(best, iters * ops_per_iter / (time.perf_counter() - t0))
    return best


def _amx_permitted() -> bool:
    """Ask Linux for the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA)."""
    try:
        return ctypes.CDLL(None, use_errno=True).syscall(158, 0x1023, 18) == 0
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True)
class CpuPeak:
    """Clock and per-core instruction throughput measured on this CPU."""

    cpu: str
    cores: int
    clock_ghz: float
    clock_source: str
    probe_gops: dict[str, float] = field(default_factory=dict)

    def per_core_gops(self, isa: str) -> float:
        return self.clock_ghz * OPS_PER_CYCLE[isa]


def _nominal_mhz() -> float | None:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.partition(":")[2])
    return None


@lru_cache(maxsize=1)
def measure_peak() -> CpuPeak:
    """Measure the core clock (a chain of dependent adds) and each ISA's instruction rate.

    Probes run only for ISAs in the cpuinfo flags (AMX also needs the kernel's permission).
    Without executable memory the clock falls back to /proc/cpuinfo "cpu MHz" (nominal).
    """
    target = detect_target()
    try:
        ghz = _best_rate(_native(_ADD_CHAIN), 100) / 1e9
        source = "measured: dependent scalar adds, 1/cycle"
    except (OSError, ValueError, TypeError):
        mhz = _nominal_mhz() or 0.0
        return CpuPeak(target.cpu, target.cores, mhz / 1e3, "/proc/cpuinfo cpu MHz (nominal)")
    probes: dict[str, float] = {}
    amx_ok = "amx_tile" in target.flags and _amx_permitted()
    config = (ctypes.c_uint8 * 64)()
    config[0] = 1  # palette 1; six 16-row x 64-byte tiles
    for t in range(6):
        config[16 + 2 * t], config[48 + t] = 64, 16
    for isa, (code, ops, flag) in _PROBES.items():
        if flag not in target.flags or (isa.startswith("amx") and not amx_ok):
            continue
        arg = ctypes.addressof(config) if isa.startswith("amx") else None
        probes[isa] = _best_rate(_native(code), ops, arg, seconds=0.03, repeats=5) / 1e9
    return CpuPeak(target.cpu, target.cores, ghz, source, probes)


# --- what a path dispatches to -------------------------------------------------------------

@contextlib.contextmanager
def _captured_fd1() -> Iterator[list[str]]:
    """Collect what native code writes to file descriptor 1 (oneDNN / MKL verbose)."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    out: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            yield out
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


def _isa_for(dtype: str, impl: str, target: Target) -> str:
    """The ISA whose peak applies to a ``dtype`` GEMM run by implementation ``impl``."""
    caps = target.capabilities
    if "amx" in impl and dtype != "fp32":
        return "amx_bf16" if dtype == "bf16" else "amx_int8"
    # An empty ``impl`` (MKL, fbgemm) is taken to use the best vector ISA in the flags.
    wide = "avx512" in impl or "avx10" in impl or (not impl and caps["avx512"])
    if not wide:
        return "avx2"
    if dtype == "bf16" and caps["bf16"]:
        return "avx512_bf16"
    if dtype == "int8" and caps["vnni"]:
        return "avx512_vnni"
    return "avx512"


def dispatch(case: Case, target: Target | None = None) -> tuple[str, str]:
    """Run ``case`` once with oneDNN and MKL verbose on: (ISA whose peak applies, kernel)."""
    target = target or detect_target()
    with _captured_fd1() as out, torch.no_grad(), \
            torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON), \
            torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):
        case.fn(case.arg)
    impls, mkl = [], []
    for line in out[0].splitlines():
        parts = line.split(",")
        if line.startswith("onednn_verbose") and "exec" in parts and len(parts) > 6:
            i = parts.index("exec")
            if parts[i + 2] in ("matmul", "inner_product", "gemm_api", "convolution"):
                impls.append(f"{parts[i + 2]}:{parts[i + 3]}" if parts[i + 3] else parts[i + 2])
        elif line.startswith("MKL_VERBOSE ") and "(" in line.split()[1]:
            mkl.append(line.split()[1].split("(")[0])
    if impls:
        impl = max(set(impls), key=impls.count)
        kernel = f"oneDNN {impl}"
        if impl == "gemm_api":  # oneDNN's GEMM API does not print its ISA
            cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL"))
            amx = target.capabilities["amx"] and (cap.upper() == "ALL" or "AMX" in cap.upper())
            kernel += f" (ISA not printed: {'AMX' if amx else 'best vector ISA'} assumed)"
            impl = "amx" if amx else ""
        return _isa_for(case.dtype, impl, target), kernel
    if mkl:
        return _isa_for(case.dtype, "", target), "MKL " + "+".join(sorted(set(mkl)))
    return _isa_for(case.dtype, "", target), case.kernel or "no verbose output"


# --- building each path --------------------------------------------------------------------

def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer.eval()


def _compiled(model: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` under torch.compile with Inductor freezing, compiled for ``x``."""
    torch._dynamo.reset()
    with warnings.catch_warnings(), torch._inductor.config.patch(freezing=True), \
            torch.no_grad():
        warnings.simplefilter("ignore")
        fn = torch.compile(model, dynamic=False)
        fn(x)
    return fn


def _sym_int8(t: torch.Tensor, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 (per tensor, or per row along ``dim``): (values, scale)."""
    amax = t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)
    scale = amax.clamp_min(1e-12) / 127
    return torch.round(t / scale).clamp(-127, 127).to(torch.int8), scale


@contextlib.contextmanager
def _qengine(name: str) -> Iterator[None]:
    if name not in torch.backends.quantized.supported_engines:
        raise RuntimeError(f"quantized engine {name!r} is not available here")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.backends.quantized.engine = previous


def _ao_weight(weight: torch.Tensor) -> torch.Tensor:
    _, scale = _sym_int8(weight, dim=1)
    return torch.quantize_per_channel(weight, scale.flatten().double(),
                                      torch.zeros(weight.shape[0], dtype=torch.long), 0,
                                      torch.qint8)


def _affine_uint8(t: torch.Tensor) -> tuple[float, int]:
    """Scale and zero point mapping ``t``'s range (widened to include 0) onto 0..255."""
    lo, hi = min(t.min().item(), 0.0), max(t.max().item(), 0.0)
    scale = (hi - lo) / 255 or 1.0
    return scale, int(round(-lo / scale))


def _ao_static(weight: torch.Tensor, x: torch.Tensor, engine: str) -> Case:
    with _qengine(engine):
        layer = torch.ao.nn.quantized.Linear(weight.shape[1], weight.shape[0], bias_=False)
        layer.set_weight_bias(_ao_weight(weight), None)
        layer.scale, layer.zero_point = _affine_uint8(F.linear(x, weight))
        qx = torch.quantize_per_tensor(x, *_affine_uint8(x), torch.quint8)
    kernel = "fbgemm (VNNI assumed)" if engine == "x86" else "oneDNN"
    return Case(layer, qx, lambda y: y.dequantize(), weight, "int8", kernel)


def _ao_dynamic(weight: torch.Tensor, x: torch.Tensor, engine: str) -> Case:
    with _qengine(engine):
        layer = torch.ao.nn.quantized.dynamic.Linear(weight.shape[1], weight.shape[0],
                                                     bias_=False)
        layer.set_weight_bias(_ao_weight(weight), None)
    kernel = "fbgemm (VNNI assumed)" if engine == "x86" else "oneDNN"
    return Case(layer, x, lambda y: y, weight, "int8", kernel)


def _pt2e_static(weight: torch.Tensor, x: torch.Tensor) -> Case:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(_linear(weight), (x,)).module()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        prepared(x)
        converted = convert_pt2e(prepared)
    return Case(_compiled(converted, x), x, lambda y: y, weight, "int8")


def _torchao_dynamic(weight: torch.Tensor, x: torch.Tensor) -> Case:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    layer = _linear(weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(layer, Int8DynamicActivationInt8WeightConfig())
    return Case(_compiled(layer, x), x, lambda y: y, weight, "int8")


def build_case(path: str, weight: torch.Tensor, x: torch.Tensor, *, block: int | None = None,
               rank: int | None = None) -> Case:
    """Prepare ``path`` computing ``x @ weight.T`` (``weight``: n x k, fp32; ``x``: m x k).

    Sparse paths take ``weight`` with its zeros in place (``sparse_bsr`` also ``block``);
    ``lowrank_fp32`` factorizes ``weight`` by truncated SVD to ``rank``. Compiled paths
    compile here, for the current thread count.
    """
    if path == "fp32_eager":
        return Case(lambda a: F.linear(a, weight), x, lambda y: y, weight, kernel="F.linear")
    if path == "fp32_onednn":
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, x.shape[0])
        return Case(lambda a: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""),
                    x, lambda y: y, weight)
    if path == "fp32_inductor":
        return Case(_compiled(_linear(weight), x), x, lambda y: y, weight)
    if path == "bf16_eager":
        wb = weight.bfloat16()
        return Case(lambda a: F.linear(a, wb), x.bfloat16(), lambda y: y.float(), weight, "bf16")
    if path == "bf16_inductor":
        xb = x.bfloat16()
        return Case(_compiled(_linear(weight).bfloat16(), xb), xb, lambda y: y.float(), weight,
                    "bf16")
    if path == "int8_int_mm":
        xq, xs = _sym_int8(x)
        wq, ws = _sym_int8(weight, dim=1)
        wt, scale = wq.t(), (xs * ws.flatten())[None, :]
        return Case(lambda a: torch._int_mm(a, wt), xq, lambda y: y.float() * scale, weight,
                    "int8")
    if path == "int8_static_pt2e":
        return _pt2e_static(weight, x)
    if path.startswith("int8_static_ao_"):
        return _ao_static(weight, x, path.removeprefix("int8_static_ao_"))
    if path.startswith("int8_dynamic_ao_"):
        return _ao_dynamic(weight, x, path.removeprefix("int8_dynamic_ao_"))
    if path == "int8_dynamic_torchao":
        return _torchao_dynamic(weight, x)
    if path in SPARSE_PATHS:
        if path == "sparse_bsr" and not block:
            raise ValueError("The 'block' parameter of build_case is required for sparse_bsr.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            sparse = (weight.to_sparse_csr() if path == "sparse_csr"
                      else weight.to_sparse_bsr(block))
        return Case(lambda a: torch.sparse.mm(sparse, a.t()), x, lambda y: y.t(), weight,
                    kernel="torch sparse addmm (MKL sparse BLAS; no verbose)")
    if path == LOWRANK_PATH:
        if rank is None or not 1 <= rank <= min(weight.shape):
            raise ValueError(f"The 'rank' parameter of build_case must be in "
                             f"[1, {min(weight.shape)}]. Got {rank} instead.")
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        first, second = vh[:rank].contiguous(), (u[:, :rank] * s[:rank]).contiguous()
        return Case(lambda a: F.linear(F.linear(a, first), second), x, lambda y: y, second @ first)
    valid = [*GEMM_PATHS, *SPARSE_PATHS, LOWRANK_PATH]
    raise ValueError(f"Unknown path {path!r}; valid paths: {valid}.")


def case_error(case: Case, x: torch.Tensor) -> float:
    """Relative error of ``case`` against fp32 ``F.linear(x, case.weight)``."""
    with torch.no_grad():
        return relative_error(case.to_float(case.fn(case.arg)), F.linear(x, case.weight))


def tolerance(dtype: str) -> float:
    """Largest relative error accepted for a path computing in ``dtype``."""
    known = {"fp32": TOLERANCE["fp32"], "bf16": TOLERANCE["bf16"]}
    return known.get(dtype, TOLERANCE["int8_static"])


# --- running -------------------------------------------------------------------------------

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
    target, peak = detect_target(), measure_peak()
    cores = min(threads, target.cores)
    gen = torch.Generator().manual_seed(0)
    rows: list[BenchRow] = []

    def log(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)

    def measure(path: str, group: str, weight: torch.Tensor, x: torch.Tensor, flops: float,
                baseline_ms: float | None, **extra) -> BenchRow | None:
        try:
            with torch_threads(threads):
                case = build_case(path, weight, x, block=extra.get("block"),
                                  rank=extra.get("rank"))
                error = case_error(case, x)
                isa, kernel = dispatch(case, target)
                if ":ref" in kernel:  # oneDNN's scalar reference code: not a real path, slow
                    raise RuntimeError(f"dispatches to a reference kernel ({kernel})")
                stats = time_interleaved({path: case.fn}, case.arg, threads=threads,
                                         **plan.timing)[path]
        except Exception as exc:  # noqa: BLE001 - report and go on with the other paths
            log(f"  skipped {path} {extra or ''}: {type(exc).__name__}: {exc}")
            return None
        finally:
            torch._dynamo.reset()
        m, k, n = x.shape[0], x.shape[1], weight.shape[0]
        gops = flops / (stats.median_ms * 1e-3) / 1e9
        peak_gops = cores * peak.per_core_gops(isa)
        probe = peak.probe_gops.get(isa)
        note = (f"peak = {cores} core(s) x {peak.clock_ghz:.2f} GHz ({peak.clock_source}) x "
                f"{OPS_PER_CYCLE[isa]} op/cycle ({_ISA_NOTE[isa]})")
        speedup = baseline_ms / stats.median_ms if baseline_ms else None
        if path == "fp32_eager":
            speedup = 1.0
        row = BenchRow(
            name=path if path != "sparse_bsr" else f"sparse_bsr{extra['block']}", group=group,
            m=m, k=k, n=n, threads=threads, dtype=case.dtype, gops=gops, peak_gops=peak_gops,
            fraction_of_peak=gops / peak_gops if peak_gops > 0 else math.nan,
            speedup_vs_fp32=speedup, isa=isa, kernel=kernel, median_ms=stats.median_ms,
            calls=stats.calls, max_rel_error=error,
            flop_basis="dense-equivalent" if group == "sparse" and path != "fp32_eager"
            else "executed",
            probe_gops=None if probe is None else probe * cores, clock_ghz=peak.clock_ghz,
            assumption=note, **extra)
        log(f"  {row.name:24s} {m}x{k}x{n} {_extra(row):10s} {gops:9.1f} GOP/s "
            f"{row.fraction_of_peak:6.1%} of {isa} peak  {kernel}")
        rows.append(row)
        return row

    log(f"{target.cpu}: clock {peak.clock_ghz:.2f} GHz ({peak.clock_source}); probes "
        + ", ".join(f"{k} {v:.0f}" for k, v in peak.probe_gops.items()) + " GOP/s per core")
    for group, x, weight, cases in _groups(plan, gen):
        m, k, n = x.shape[0], x.shape[1], weight.shape[0]
        base = measure("fp32_eager", group, weight, x, 2 * m * n * k, None,
                       **({"sparsity": 0.0} if group == "sparse" else {}))
        for path, path_weight, flops, extra in cases:
            measure(path, group, path_weight, x, flops, base.median_ms if base else None,
                    **extra)
    return rows


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
    """Render rows as "table" (with the peak assumptions) or "json" (a list of row objects)."""
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
    lines.append("* dense-equivalent GOP/s (2*m*n*k of the dense GEMM / time); "
                 "low rank counts the FLOPs executed.")
    for key, value in break_even(rows).items():
        shown = value if isinstance(value, str) else (
            f"{value:.0%} sparsity" if key.startswith("sparse") else f"rank {value:.0f}")
        lines.append(f"break-even vs dense fp32, {key}: {shown}")
    for isa in dict.fromkeys(r.isa for r in rows):
        r = next(r for r in rows if r.isa == isa)
        probe = "" if r.probe_gops is None else f"; instruction-rate probe {r.probe_gops:.0f}"
        lines.append(f"{isa}: {r.assumption}{probe}")
    if rows:  # every ISA's peak at the same clock, for comparison with the one a path used
        cores = rows[0].peak_gops / (rows[0].clock_ghz * OPS_PER_CYCLE[rows[0].isa])
        peaks = ", ".join(f"{isa} {cores * rows[0].clock_ghz * ops:.0f}"
                          for isa, ops in OPS_PER_CYCLE.items())
        lines.append(f"formula peaks at this clock and core count, GOP/s: {peaks}")
    return "\n".join(lines)
