"""The GEMM paths the kernel benchmark times: building each one, checking it against fp32, and
naming the kernel (and so the ISA) it dispatches to, from oneDNN / MKL verbose output."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import TOLERANCE, Target, detect_target, relative_error

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


@dataclass(frozen=True)
class Case:
    """A path ready to time: ``fn(arg)``; ``to_float`` maps its output to ``x @ weight.T``."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    arg: torch.Tensor
    to_float: Callable[[torch.Tensor], torch.Tensor]
    weight: torch.Tensor
    dtype: str = "fp32"
    kernel: str = ""  # what runs when no verbose output names it


# --- what a path dispatches to ---

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


# --- building each path ---

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

