"""A latency model per target: a structure's latency predicted from micro-timings of its layers,
corrected by the full measurements made on that target, with its error measured honestly."""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from scipy.optimize import nnls
from torch import nn
from torch.nn.modules.utils import _ntuple

from ..kernels import Target, detect_target
from ..spaces import is_weight_layer, model_io
from ._job import save_json

Format = Literal["fp32", "bf16", "int8", "int8_dynamic", "int8_weight"]
FORMATS: tuple[str, ...] = get_args(Format)
OTHER = "other"  # the kind of a non-weight module's work (norms, activations, ...)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
POOLS = tuple(t.__name__.lower() for t in _POOLS)  # timed kinds that have no weights
_VIEWS = (nn.Flatten, nn.Identity, nn.Dropout, nn.Unflatten)  # no work once compiled
FORMAT_BYTES = {"fp32": 4, "bf16": 2, "int8": 1, "int8_dynamic": 4, "int8_weight": 4}
PRIOR = 0.1  # weight of "factor 1, no overhead" against each measurement's relative error


@dataclass(frozen=True)
class LayerCall:
    """One call of a weight layer (or, with kind ``"other"``, of a non-weight module) as run.

    Shapes include the batch. ``format`` is the numeric format it runs in; ``sparsity`` the
    fraction of zero weights and ``layout`` how they are stored (set by the caller; layer
    calls are timed dense, as a densified sparse layer runs).
    """

    kind: str  # "linear", "conv1d", "conv2d", "conv3d", a pooling (``POOLS``) or "other"
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = False
    format: str = "fp32"
    sparsity: float = 0.0
    layout: str = "dense"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"The 'format' parameter of LayerCall must be one of "
                             f"{list(FORMATS)}. Got {self.format!r} instead.")

    @property
    def in_features(self) -> int:
        return self.input_shape[1] if self.kind.startswith("conv") else self.input_shape[-1]

    @property
    def macs(self) -> int:
        """Multiply-accumulates: one per output element and weight it reads."""
        if self.kind == OTHER:
            return 0
        if self.kind in POOLS:  # one comparison or addition per window element
            return math.prod(self.output_shape) * math.prod(self.kernel)
        per_output = self.in_features // self.groups * math.prod(self.kernel or (1,))
        return math.prod(self.output_shape) * per_output

    @property
    def weights(self) -> int:
        if self.kind == OTHER or self.kind in POOLS:
            return 0
        out = self.output_shape[1] if self.kind.startswith("conv") else self.output_shape[-1]
        return out * self.in_features // self.groups * math.prod(self.kernel or (1,))

    @property
    def bytes(self) -> int:
        """Bytes read (input, weights) and written (output) in its format."""
        width = FORMAT_BYTES[self.format]
        weight = 1 if self.format in ("int8", "int8_dynamic", "int8_weight") else width
        activations = math.prod(self.input_shape) + math.prod(self.output_shape)
        return activations * width + self.weights * weight

    def to_list(self) -> list:
        return [list(v) if isinstance(v, tuple) else v for v in astuple(self)]

    @classmethod
    def from_list(cls, values: Sequence) -> LayerCall:
        return cls(*(tuple(v) if isinstance(v, list) else v for v in values))


def layer_calls(model: nn.Module, example_input: model_io.Inputs,
                formats: Mapping[str, str] | None = None) -> tuple[LayerCall, ...]:
    """The calls of ``model``'s weight layers and leaf modules in one float forward, in order.

    ``formats`` maps layer names to formats (missing: "fp32"); a non-weight module takes
    the format of the weight layer called before it. Pooling is recorded with its geometry
    (kind in ``POOLS``), other non-weight modules as kind ``"other"``.
    """
    formats = formats or {}
    names = {m: n for n, m in model.named_modules()}
    calls: list[LayerCall] = []
    current = ["fp32"]

    def hook(module, inputs, output):
        if not (isinstance(output, torch.Tensor) and inputs and torch.is_tensor(inputs[0])):
            return
        if is_weight_layer(module):
            current[0] = formats.get(names[module], "fp32")
            calls.append(_weight_call(module, inputs[0], output, current[0]))
        elif isinstance(module, _POOLS):
            calls.append(_pool_call(module, inputs[0], output, current[0]))
        elif not isinstance(module, _VIEWS):
            calls.append(LayerCall(OTHER, tuple(inputs[0].shape), tuple(output.shape),
                                   format=current[0]))

    leaves = [m for m in model.modules() if is_weight_layer(m) or not any(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model_io.predict(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return tuple(calls)


def _weight_call(module: nn.Module, x: torch.Tensor, y: torch.Tensor, fmt: str) -> LayerCall:
    common = dict(bias=getattr(module, "bias", None) is not None, format=fmt)
    if isinstance(module, nn.modules.conv._ConvNd):
        if isinstance(module.padding, str):  # "same" / "valid": as numbers
            pad = tuple(d * (k - 1) // 2 if module.padding == "same" else 0
                        for k, d in zip(module.kernel_size, module.dilation, strict=True))
        else:
            pad = tuple(module.padding)
        return LayerCall(f"conv{len(module.kernel_size)}d", tuple(x.shape), tuple(y.shape),
                         tuple(module.kernel_size), tuple(module.stride), pad,
                         tuple(module.dilation), module.groups, **common)
    return LayerCall("linear", tuple(x.shape), tuple(y.shape), **common)


def _pool_call(module: nn.Module, x: torch.Tensor, y: torch.Tensor, fmt: str) -> LayerCall:
    expand = _ntuple(int(type(module).__name__[-2]))
    stride = module.stride if module.stride is not None else module.kernel_size
    return LayerCall(type(module).__name__.lower(), tuple(x.shape), tuple(y.shape),
                     *(tuple(expand(v)) for v in (module.kernel_size, stride, module.padding,
                                                  getattr(module, "dilation", 1))), format=fmt)


def target_key(target: Target | None = None, *, threads: int, batch: int,
               lowering: str) -> str:
    """The fingerprint a latency model is valid for: CPU, kernel ISA flags, torch, threads,
    batch and lowering."""
    target = target or detect_target()
    flags = sorted(f for f in target.flags if f in ("avx512_vnni", "avx512_bf16", "amx_tile",
                                                     "amx_int8", "amx_bf16", "avx_vnni"))
    return (f"{target.cpu} | {','.join(flags) or 'no-vnni'} | torch {torch.__version__} | "
            f"threads {threads} | batch {batch} | {lowering}")


@dataclass(frozen=True)
class Correction:
    """Full measurements' correction: ``sum_f factor[f] * micro-timed ms of format f (weight
    layers, pooling) + overhead_ms + other_ms_per_mb * MB moved by "other" modules``."""

    factors: tuple[tuple[str, float], ...] = ()
    overhead_ms: float = 0.0
    other_ms_per_mb: float = 0.0


@dataclass(frozen=True)
class ErrorReport:
    """Leave-one-out error over the distinct structures measured in full (absolute
    relative errors), and the raw micro-timing sum's error; NaN below three structures."""

    count: int
    median: float
    p90: float
    kendall_tau: float
    raw_median: float
    raw_p90: float


class LatencyModel:
    """Latency predictions for one target (``key``, see ``target_key``), in ms per call.

    ``table`` holds micro-timed layer calls; an untimed call is estimated by a
    non-negative fit of ``a + b * MACs + c * bytes`` per (kind, format) over the table.
    """

    def __init__(self, key: str, table: Mapping[LayerCall, float] | None = None,
                 measurements: Iterable[tuple[tuple[LayerCall, ...], float]] = ()):
        self.key = key
        self.table: dict[LayerCall, float] = dict(table or {})
        self.measurements: list[tuple[tuple[LayerCall, ...], float]] = list(measurements)
        self._fits: dict[tuple[str, str], np.ndarray] = {}
        self._correction: Correction | None = None

    def add_timings(self, timings: Mapping[LayerCall, float]) -> None:
        self.table.update(timings)
        self._fits.clear()

    def add_measurement(self, calls: Sequence[LayerCall], measured_ms: float) -> None:
        if not measured_ms > 0:
            raise ValueError(f"measured_ms must be positive. Got {measured_ms} instead.")
        self.measurements.append((tuple(calls), float(measured_ms)))
        self._correction = None

    def layer_ms(self, call: LayerCall) -> float:
        """The call's micro-timing, else its per-(kind, format) fit; KeyError without one."""
        if call.kind == OTHER:
            return 0.0
        if call in self.table:
            return self.table[call]
        group = (call.kind, call.format)
        if group not in self._fits:
            rows = [(c, t) for c, t in self.table.items() if (c.kind, c.format) == group]
            if not rows:
                raise KeyError(f"no micro-timing of a {call.kind} layer in {call.format}")
            self._fits[group] = nnls(np.array([_features(c) for c, _ in rows]),
                                     np.array([t for _, t in rows]))[0]
        return float(np.dot(_features(call), self._fits[group]))

    def raw(self, calls: Sequence[LayerCall]) -> float:
        """The sum of the layers' micro-timings, uncorrected."""
        return sum(self.layer_ms(c) for c in calls)

    def predict(self, calls: Sequence[LayerCall]) -> float:
        """Predicted ms per call: the layers' times through the fitted correction."""
        return self._apply(self.correction, calls)

    def ratio(self, calls: Sequence[LayerCall], teacher_calls: Sequence[LayerCall]) -> float:
        """The predicted speedup of ``calls`` over ``teacher_calls``."""
        return self.predict(teacher_calls) / self.predict(calls)

    @property
    def correction(self) -> Correction:
        self._correction = self._correction or self._fit(self.distinct())
        return self._correction

    def distinct(self) -> list[tuple[tuple[LayerCall, ...], float]]:
        """The measurements one per structure (the median of its timings), in the order
        first measured: a structure timed again (the teacher, beside every trial) counts
        once in the fit and in the error report."""
        timings: dict[tuple[LayerCall, ...], list[float]] = {}
        for calls, ms in self.measurements:
            timings.setdefault(calls, []).append(ms)
        return [(calls, statistics.median(ms)) for calls, ms in timings.items()]

    def _apply(self, fit: Correction, calls: Sequence[LayerCall]) -> float:
        per_format, other = self._split(calls)
        factors = dict(fit.factors)  # a format no measurement had: as micro-timed
        return (sum(factors.get(f, 1.0) * ms for f, ms in per_format.items())
                + fit.overhead_ms * bool(calls) + fit.other_ms_per_mb * other)

    def _split(self, calls: Sequence[LayerCall]) -> tuple[dict[str, float], float]:
        """Micro-timed ms per format, and MB moved by "other" modules."""
        per_format = dict.fromkeys(FORMATS, 0.0)
        other = 0.0
        for c in calls:
            if c.kind == OTHER:
                other += c.bytes / 1e6
            else:
                per_format[c.format] += self.layer_ms(c)
        return per_format, other

    def _fit(self, measurements: Sequence[tuple[tuple[LayerCall, ...], float]]) -> Correction:
        """Factors per format, overhead and non-weight cost minimizing the relative error
        (non-negative, pulled towards "as micro-timed", reweighted against outliers)."""
        if len(measurements) < 2:
            return Correction(tuple((f, 1.0) for f in FORMATS))
        formats = sorted({c.format for calls, _ in measurements for c in calls})
        split = [self._split(calls) for calls, _ in measurements]
        rows = np.array([[t[f] for f in formats] + [1.0, other] for t, other in split])
        y = np.array([ms for _, ms in measurements])
        a, b = rows / y[:, None], np.ones(len(y))
        prior_a = np.eye(len(formats) + 2) * PRIOR
        prior_a[len(formats):, len(formats):] *= 1.0 / max(float(np.median(y)), 1e-9)
        prior_b = np.array([PRIOR] * len(formats) + [0.0, 0.0])
        weights = np.ones(len(y))
        for _ in range(4):  # iteratively reweighted: residuals beyond 5% count linearly
            theta = nnls(np.vstack([a * weights[:, None], prior_a]),
                         np.concatenate([b * weights, prior_b]))[0]
            weights = 1.0 / np.sqrt(np.maximum(np.abs(a @ theta - 1.0) / 0.05, 1.0))
        factors = tuple((f, float(k)) for f, k in zip(formats, theta, strict=False))
        return Correction(factors, float(theta[-2]), float(theta[-1]))

    def error_report(self) -> ErrorReport:
        """Leave-one-out over the full measurements: each predicted by the correction fitted
        to the others."""
        distinct = self.distinct()
        measured = [ms for _, ms in distinct]
        raw = error_summary([self.raw(c) for c, _ in distinct], measured)
        if len(measured) < 3:
            return ErrorReport(len(measured), math.nan, math.nan, math.nan, raw[0], raw[1])
        loo = [self._apply(self._fit(distinct[:i] + distinct[i + 1:]), c)
               for i, (c, _) in enumerate(distinct)]
        return ErrorReport(len(measured), *error_summary(loo, measured), raw[0], raw[1])

    def to_dict(self) -> dict:
        return {"key": self.key,
                "table": [[c.to_list(), ms] for c, ms in self.table.items()],
                "measurements": [[[c.to_list() for c in calls], ms]
                                 for calls, ms in self.measurements]}

    @classmethod
    def from_dict(cls, data: Mapping) -> LatencyModel:
        return cls(data["key"], {LayerCall.from_list(c): ms for c, ms in data["table"]},
                   [(tuple(LayerCall.from_list(c) for c in calls), ms)
                    for calls, ms in data["measurements"]])

    def save(self, path: str | Path) -> None:
        """Write as JSON, whole or not at all (a temporary file renamed over ``path``)."""
        save_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> LatencyModel:
        """The model saved at ``path``."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    @staticmethod
    def path(cache_dir: str | Path, key: str) -> Path:
        """Where the model of target ``key`` is kept under ``cache_dir`` (v2: pooling timed)."""
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        return Path(cache_dir) / "latency" / f"model-v2-{digest}.json"


def error_summary(predicted: Sequence[float], measured: Sequence[float]
                  ) -> tuple[float, float, float]:
    """Median and 90th percentile of the absolute relative error, and Kendall's tau."""
    from scipy.stats import kendalltau

    if not measured:
        return math.nan, math.nan, math.nan
    errors = [abs(p / m - 1.0) for p, m in zip(predicted, measured, strict=True)]
    tau = kendalltau(predicted, measured).statistic if len(errors) > 1 else math.nan
    return statistics.median(errors), float(np.percentile(errors, 90)), float(tau)


def _features(call: LayerCall) -> list[float]:
    return [1e-3, call.macs * 1e-9, call.bytes * 1e-6]  # per-call, per GMAC, per MB
