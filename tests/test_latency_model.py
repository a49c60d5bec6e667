"""The latency model: layer calls, micro-timings, the fitted correction and its honest error."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from paretoslim.evaluators import (
    POOLS,
    LatencyModel,
    LayerCall,
    layer_calls,
    target_key,
    time_layer_calls,
)
from paretoslim.spaces import layer_formats, register_weight_layer


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.head(self.pool(torch.relu(self.conv(x))).flatten(1))


class Conv1D(nn.Module):
    """Shaped like transformers' Conv1D: a linear layer with a transposed weight."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.weight, self.bias = nf, nn.Parameter(torch.randn(nx, nf)), None

    def forward(self, x):
        return x @ self.weight


register_weight_layer(Conv1D.__module__, Conv1D.__qualname__, lambda layer: layer)


def linear(n: int, fmt: str = "fp32", batch: int = 4) -> LayerCall:
    return LayerCall("linear", (batch, n), (batch, n), format=fmt)


def test_layer_calls_record_shapes_geometry_and_formats():
    model = TinyCNN()
    formats = layer_formats(model, "int8_static", ["head"])
    calls = layer_calls(model, torch.randn(2, 3, 16, 16), formats)
    conv, head = (c for c in calls if c.kind in ("conv2d", "linear"))
    assert (conv.kind, conv.input_shape, conv.output_shape) == ("conv2d", (2, 3, 16, 16),
                                                                (2, 8, 8, 8))
    assert (conv.kernel, conv.stride, conv.padding, conv.groups, conv.bias) == (
        (3, 3), (2, 2), (1, 1), 1, False)
    assert (conv.format, head.format) == ("int8", "fp32")
    assert head.input_shape == (2, 128) and head.output_shape == (2, 5) and head.bias
    assert conv.macs == 2 * 8 * 8 * 8 * 3 * 9 and head.macs == 2 * 5 * 128
    pool = next(c for c in calls if c.kind == "maxpool2d")
    assert pool.output_shape == (2, 8, 4, 4) and pool.format == "int8"  # follows the conv
    assert (pool.kernel, pool.stride, pool.padding, pool.dilation) == ((2, 2), (2, 2), (0, 0),
                                                                      (1, 1))
    assert pool.weights == 0 and pool.macs == 2 * 8 * 4 * 4 * 4


def test_pooling_is_timed_in_its_format():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.MaxPool2d(3, 2, ceil_mode=True),
                          nn.AvgPool2d(2), nn.Flatten(), nn.Linear(32, 4), nn.ReLU())
    for fmt in ("fp32", "bf16", "int8"):
        calls = layer_calls(model, torch.randn(2, 3, 12, 12), dict.fromkeys(["0", "4"], fmt))
        pools = [c for c in calls if c.kind in POOLS]
        assert [(c.kind, c.format) for c in pools] == [("maxpool2d", fmt), ("avgpool2d", fmt)]
        assert pools[0].output_shape == (2, 8, 5, 5)  # ceil mode, read from the shapes
        timings = time_layer_calls(calls, threads=1, seconds=0.001, isolated=False)
        assert set(timings) == {c for c in calls if c.kind != "other"}
        assert all(ms > 0 for ms in timings.values())


def test_weight_only_formats_leave_convolutions_in_float_and_conv1d_is_a_linear():
    assert set(layer_formats(TinyCNN(), "int8_weight_only").items()) == {
        ("conv", "fp32"), ("head", "int8_weight")}
    calls = layer_calls(nn.Sequential(Conv1D(6, 4)), torch.randn(3, 4))
    assert [(c.kind, c.input_shape, c.output_shape) for c in calls] == [
        ("linear", (3, 4), (3, 6))]
    with pytest.raises(ValueError, match="format"):
        LayerCall("linear", (1, 2), (1, 2), format="int4")


def test_distinct_calls_are_timed_once():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 8))
    calls = layer_calls(model, torch.randn(4, 16))
    assert len([c for c in calls if c.kind == "linear"]) == 3
    timings = time_layer_calls(calls, threads=1, seconds=0.001, isolated=False)
    assert len(timings) == 2 and all(ms > 0 for ms in timings.values())


def test_untimed_calls_follow_a_recovered_linear_cost():
    def cost(call):  # ms: per call, per GMAC, per MB
        return 0.01 + 3.0 * call.macs * 1e-9 + 0.5 * call.bytes * 1e-6

    table = {linear(n, batch=b): 0.0 for n in (64, 256, 1024) for b in (1, 8, 64)}
    model = LatencyModel("k", {c: cost(c) for c in table})
    unseen = linear(512, batch=32)
    assert model.layer_ms(unseen) == pytest.approx(cost(unseen), rel=1e-6)
    with pytest.raises(KeyError, match="int8"):
        model.layer_ms(linear(512, "int8"))


def synthetic(model: LatencyModel, sizes, noise=()):
    """Measurements of a machine running fp32 1.3x and int8 0.8x slower than micro-timed,
    plus 0.2 ms per call."""
    for i, n in enumerate(sizes):
        calls = (linear(n), linear(n // 2, "int8"))
        truth = 1.3 * model.raw(calls[:1]) + 0.8 * model.raw(calls[1:]) + 0.2
        model.add_measurement(calls, truth * (noise[i] if noise else 1.0))


def timed_model() -> LatencyModel:
    sizes = [2 ** k for k in range(4, 12)]
    table = {linear(n, f): 1e-3 * n * (1 + (f == "fp32")) for n in sizes for f in
             ("fp32", "int8")}
    return LatencyModel("k", table)


def test_a_fitted_correction_reduces_the_error():
    model = timed_model()
    synthetic(model, [16, 64, 256, 1024])
    held_out = [(linear(n), linear(n // 2, "int8")) for n in (32, 128, 512, 2048)]
    truth = [1.3 * model.raw(c[:1]) + 0.8 * model.raw(c[1:]) + 0.2 for c in held_out]
    raw = max(abs(model.raw(c) / t - 1) for c, t in zip(held_out, truth, strict=True))
    fitted = max(abs(model.predict(c) / t - 1) for c, t in zip(held_out, truth, strict=True))
    assert fitted < 0.03 < raw
    factors = dict(model.correction.factors)
    assert factors["fp32"] == pytest.approx(1.3, rel=0.05)
    assert model.correction.overhead_ms >= 0
    assert model.ratio(held_out[0], held_out[-1]) > 1


def test_error_report_is_leave_one_out():
    model = timed_model()
    assert math.isnan(model.error_report().median)  # nothing measured yet
    synthetic(model, [16, 32, 64, 128, 256, 512, 1024, 2048])
    exact = model.error_report()
    assert exact.count == 8 and exact.median < 0.02 and exact.kendall_tau > 0.85
    assert exact.raw_median > 0.1  # the uncorrected sum is reported too
    noisy = timed_model()
    synthetic(noisy, [16, 32, 64, 128, 256, 512, 1024, 2048],
              noise=[1.0, 1.0, 1.0, 1.5, 1.0, 1.0, 1.0, 1.0])
    report = noisy.error_report()
    assert report.p90 > 0.15  # the outlier, predicted from the others, shows
    assert report.median < report.p90


def test_a_structure_timed_again_counts_once_in_the_error_report():
    """The teacher is timed beside every trial: its repeats must not fill the report with
    perfect predictions."""
    model = timed_model()
    synthetic(model, [16, 32, 64, 128, 256, 512, 1024, 2048],
              noise=[1.0, 1.4, 1.0, 0.7, 1.0, 1.3, 1.0, 0.75])
    alone = model.error_report()
    teacher = (linear(2048), linear(2048, "int8"))
    for _ in range(30):
        model.add_measurement(teacher, 5.0)
    report = model.error_report()
    assert report.count == alone.count + 1
    assert report.median > 0.5 * alone.median > 0.05
    assert len(model.measurements) == 38  # every timing kept, each structure fitted once


def test_save_and_load_round_trip(tmp_path):
    model = timed_model()
    synthetic(model, [16, 64, 256])
    conv = LayerCall("conv2d", (1, 3, 8, 8), (1, 4, 8, 8), (3, 3), (1, 1), (1, 1), (1, 1))
    model.add_timings({conv: 0.5})
    key = target_key(threads=1, batch=1, lowering="aoti")
    path = LatencyModel.path(tmp_path, key)
    model.key = key
    model.save(path)
    loaded = LatencyModel.load(path)
    assert loaded.key == key and loaded.table == model.table
    assert loaded.measurements == model.measurements
    assert loaded.predict((conv, linear(64))) == pytest.approx(model.predict((conv, linear(64))))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_pooling_counts_in_its_formats_time():
    pool = LayerCall("maxpool2d", (4, 8, 8, 8), (4, 8, 4, 4), (2, 2), (2, 2), (0, 0), (1, 1),
                     format="int8")
    model = LatencyModel("k", {linear(64, "int8"): 1.0, pool: 0.5})
    calls = (linear(64, "int8"), pool, LayerCall("other", (4, 64), (4, 64), format="int8"))
    assert model.raw(calls) == pytest.approx(1.5)
    for scale in (1.0, 2.0, 3.0):  # int8 runs 1.2x its micro-timings, pooling included
        model.add_measurement(calls[:1] * int(scale) + calls[1:], 1.2 * (scale + 0.5))
    assert dict(model.correction.factors)["int8"] == pytest.approx(1.2, rel=0.03)
