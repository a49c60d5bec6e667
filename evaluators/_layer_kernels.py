"""Layer micro-timings: each layer call run alone through the kernel its compiled model runs."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from ._latency import _clock, measurement_lock, torch_threads
from ._latency_model import FORMATS, OTHER, POOLS, LayerCall


def time_layer_calls(calls: Iterable[LayerCall], threads: int = 1, *,
                     seconds: float = 0.02, isolated: bool = True) -> dict[LayerCall, float]:
    """The median ms per call of each distinct layer call of a timed kind (not ``"other"``),
    through the kernels the compiled model runs (see ``kernel``), timed in a fresh process
    unless not ``isolated``, about ``seconds`` each, under the machine's measurement lock."""
    distinct = tuple(dict.fromkeys(c for c in calls if c.kind != OTHER))
    if not distinct:
        return {}
    job = LayerTimingJob(distinct, threads, seconds)
    if isolated:
        from ._job import run_isolated

        return dict(zip(distinct, run_isolated(job, timeout_s=job.timeout()), strict=True))
    return dict(zip(distinct, job.run(), strict=True))


@dataclass(frozen=True)
class LayerTimingJob:
    """Micro-timings of distinct layer calls, run by the measuring process (``run_isolated``)."""

    calls: tuple[LayerCall, ...]
    threads: int = 1
    seconds: float = 0.02

    def timeout(self) -> float:
        return 120.0 + len(self.calls) * (10 * self.seconds + 2.0)

    def run(self) -> list[float]:
        return time_calls(self.calls, self.threads, self.seconds)


def time_calls(calls: Sequence[LayerCall], threads: int, seconds: float) -> list[float]:
    """The median ms of each call, here, each timed for about ``seconds``."""
    results = []
    with measurement_lock(), torch_threads(threads), torch.no_grad():
        for call in calls:
            fn = kernel(call)
            for _ in range(5):  # packs, allocates, warms the caches
                fn()
            start = _clock()
            fn()
            calls_needed = int(min(5000, max(15, seconds / max(_clock() - start, 1e-7))))
            samples = []
            for _ in range(calls_needed):
                start = _clock()
                fn()
                samples.append(_clock() - start)
            results.append(statistics.median(samples) * 1e3)
    return results


def kernel(call: LayerCall) -> Callable[[], object]:
    """A call without arguments running ``call`` through the kernel Inductor's frozen
    lowering runs: oneDNN convolution (float, packed weights, channels last), MKL packed
    linear (fp32), oneDNN linear (bf16), oneDNN qconv / qlinear (int8, uint8 activations);
    int8 weight-only linear is folded to float weights, then scaled. Convolutions of the
    float-activation int8 formats run in fp32 (those schemes convert Linear layers only).
    Pooling runs channels last in the format's activation dtype (uint8 max pooling for
    int8, as its lowering calls), float max pooling through oneDNN (no indices)."""
    torch.manual_seed(0)
    if call.kind in POOLS:
        return _pool(call)
    if call.kind == "linear":
        m, k, n = math.prod(call.input_shape[:-1]), call.in_features, call.output_shape[-1]
        return _LINEAR[call.format](torch.randn(m, k), torch.randn(n, k) * k ** -0.5,
                                    torch.randn(n) if call.bias else None)
    if not call.kind.startswith("conv"):
        raise ValueError(f"No kernel for a layer of kind {call.kind!r}.")
    x_shape, kernel_size = list(call.input_shape), list(call.kernel)
    stride, padding, dilation = list(call.stride), list(call.padding), list(call.dilation)
    if len(kernel_size) == 1:  # run as the 2-d convolution of height 1 that Inductor calls
        x_shape.insert(2, 1)
        kernel_size, stride, padding, dilation = ([1] + kernel_size, [1] + stride,
                                                  [0] + padding, [1] + dilation)
    out = call.output_shape[1]
    w = torch.randn(out, call.in_features // call.groups, *kernel_size)
    b = torch.randn(out) if call.bias else None
    geometry = (stride, padding, dilation, call.groups)
    if call.format == "int8":
        return _qconv(x_shape, w, b, *geometry)
    dtype = torch.bfloat16 if call.format == "bf16" else torch.float32
    x = _channels_last(torch.randn(x_shape)).to(dtype)
    w, b = w.to(dtype), None if b is None else b.to(dtype)
    if len(kernel_size) == 2:
        w = torch.ops.mkldnn._reorder_convolution_weight(w, padding, stride, dilation,
                                                         call.groups, x_shape)
    return partial(torch.ops.mkldnn._convolution_pointwise, x, w, b, padding, stride,
                   dilation, call.groups, "none", [], "")


def _pool(call: LayerCall) -> Callable[[], object]:
    n, ceil = len(call.kernel), _ceil_mode(call)
    window = (list(call.kernel), list(call.stride), list(call.padding))
    if call.kind.startswith("avg"):
        x = _channels_last(torch.randn(call.input_shape)).to(_FLOAT[call.format])
        return partial(getattr(torch.ops.aten, f"avg_pool{n}d"), x, *window, ceil)
    if call.format == "int8" and n == 2:
        qx = _channels_last(torch.randint(0, 256, call.input_shape, dtype=torch.uint8))
        return partial(torch.ops.quantized.max_pool2d, qx, *window, list(call.dilation), ceil)
    x = _channels_last(torch.randn(call.input_shape)).to(_FLOAT[call.format])
    onednn = getattr(torch, f"mkldnn_max_pool{n}d", None)
    if onednn is not None and torch.backends.mkldnn.is_available():
        try:
            fn = partial(onednn, x.to_mkldnn(), *window, list(call.dilation), ceil)
            fn()
            return fn
        except RuntimeError:  # a dtype or geometry oneDNN does not take: the ATen kernel
            pass
    return partial(getattr(torch.ops.aten, f"max_pool{n}d"), x, *window, list(call.dilation),
                   ceil)


def _ceil_mode(call: LayerCall) -> bool:
    """Whether the recorded output size needs ``ceil_mode`` (pooling does not record it)."""
    floor = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in zip(
        call.input_shape[2:], call.kernel, call.stride, call.padding, call.dilation,
        strict=True)]
    return tuple(floor) != tuple(call.output_shape[2:])


# the activation dtype pooling runs in (int8 static: uint8 for 2-d max pooling only)
_FLOAT = {f: torch.bfloat16 if f == "bf16" else torch.float32 for f in FORMATS}


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return x.contiguous(memory_format=formats[x.dim()]) if x.dim() in formats else x


def _qconv(x_shape, w, b, stride, padding, dilation, groups) -> Callable[[], object]:
    qx = _channels_last(torch.randint(0, 256, x_shape, dtype=torch.uint8))
    qw = torch.randint(-127, 128, w.shape, dtype=torch.int8)
    scales, zeros = torch.rand(w.shape[0]) * 1e-2 + 1e-3, torch.zeros(w.shape[0],
                                                                       dtype=torch.int64)
    packed = torch.ops.onednn.qconv_prepack(qw, scales, 0.02, 0, stride, padding, dilation,
                                            groups, x_shape)
    return partial(torch.ops.onednn.qconv_pointwise.tensor, qx, torch.tensor(0.02),
                   torch.tensor(0), packed, scales, zeros, b, stride, padding, dilation,
                   groups, 0.05, 0, torch.uint8, "none", [], "")


def _linear_fp32(x, w, b):
    if torch._C.has_mkl:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, x.shape[0])
        return partial(torch.ops.mkl._mkl_linear, x, packed, w, b, x.shape[0])
    return _linear_onednn(x, w, b)


def _linear_onednn(x, w, b):
    packed = torch.ops.mkldnn._reorder_linear_weight(w, x.shape[0])
    return partial(torch.ops.mkldnn._linear_pointwise, x, packed, b, "none", [], "")


def _linear_weight_only(x, w, b):
    matmul, scales = _linear_fp32(x, w, None), torch.rand(w.shape[0])
    if b is None:
        return lambda: matmul().mul_(scales)
    return lambda: torch.addcmul(b, matmul(), scales)


def _qlinear(x, w, b, output=torch.uint8):
    qx = torch.randint(0, 256, x.shape, dtype=torch.uint8)
    packed = torch.ops.onednn.qlinear_prepack(torch.randint(-127, 128, w.shape,
                                                            dtype=torch.int8), list(x.shape))
    scales = torch.rand(w.shape[0]) * 1e-2 + 1e-3
    zeros = torch.zeros(w.shape[0], dtype=torch.int64)
    return partial(torch.ops.onednn.qlinear_pointwise.tensor, qx, torch.tensor(0.02),
                   torch.tensor(0), packed, scales, zeros, b, 0.05, 0, output, "none", [], "")


def _qlinear_dynamic(x, w, b):
    """Activations quantized per call (range, scale, round), then int8 linear to float."""
    linear = _qlinear(x, w, b, torch.float32)

    def run():
        low, high = torch.aminmax(x)
        scale = (high - low).clamp_min(1e-8) / 255
        torch.round((x - low) / scale).clamp_(0, 255).to(torch.uint8)
        return linear()

    return run


_LINEAR = {"fp32": _linear_fp32, "bf16": lambda x, w, b: _linear_onednn(
    x.bfloat16(), w.bfloat16(), None if b is None else b.bfloat16()),
    "int8": _qlinear, "int8_dynamic": _qlinear_dynamic, "int8_weight": _linear_weight_only}
