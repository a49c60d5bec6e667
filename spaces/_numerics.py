"""Numerics without conversion: the format each weight layer runs in under a recipe, and that
format's rounding simulated in float, so a candidate's quality can be read in eager mode in
a fraction of a second (the quality proxy of a candidate, never a measurement)."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ._layers import WEIGHT_LAYERS
from ._model_io import Inputs, predict
from ._schemes import scheme

FORMATS = ("fp32", "bf16", "int8", "int8_dynamic", "int8_weight")
# the format a scheme's converted layers run in
SCHEME_FORMATS = {"fp32": "fp32", "bf16": "bf16", "int8_static": "int8",
                  "int8_dynamic": "int8_dynamic", "int8_weight_only": "int8_weight"}
KINDS = ("conv", "linear")  # the layer groups a quantization config gives formats to
_KMEANS_ITERATIONS = 8


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's Linear / Conv layers with their names, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]


def layer_kind(module: nn.Module) -> str:
    """The layer group a per-kind format override names: ``conv`` or ``linear``."""
    return "conv" if isinstance(module, nn.modules.conv._ConvNd) else "linear"


def kind_formats(quantization: Any) -> dict[str, str]:
    """The per-kind format overrides of a quantization config (``{"conv" | "linear":
    format}``; a kind whose field says ``scheme`` follows the scheme)."""
    return {kind: getattr(quantization, kind) for kind in KINDS
            if getattr(quantization, kind) != "scheme"}


def layer_formats(model: nn.Module, scheme_name: str, float_names: Iterable[str] = (),
                  kinds: dict[str, str] | None = None) -> dict[str, str]:
    """``{layer name: format}`` of every weight layer under ``scheme_name``: ``fp32`` where
    the layer is named in ``float_names`` (kept float), else the format ``kinds`` gives its
    kind (``{"conv" | "linear": "bf16" | "fp32"}``, the per-kind overrides), else the
    scheme's format where it converts the layer and ``fp32`` where it does not."""
    if scheme_name not in SCHEME_FORMATS:
        raise ValueError(f"no format is known for scheme {scheme_name!r}; known: "
                         f"{sorted(SCHEME_FORMATS)}")
    fmt, converts, kept = SCHEME_FORMATS[scheme_name], scheme(scheme_name).config().layers, \
        set(float_names)
    kinds = kinds or {}
    formats = {}
    for name, module in weight_layers(model):
        if name in kept:
            formats[name] = "fp32"
        elif layer_kind(module) in kinds:
            formats[name] = kinds[layer_kind(module)]
        else:
            formats[name] = fmt if converts(module, name) else "fp32"
    return formats


def shared_weight_layers(formats: dict[str, str], float_names: Iterable[str]) -> frozenset[str]:
    """The layers k-means weight sharing clusters: those stored in a float format (fp32 or
    bf16) that are not kept float; integer weights are stored as their own integers."""
    kept = set(float_names)
    return frozenset(n for n, f in formats.items() if f in ("fp32", "bf16") and n not in kept)


def simulate_numerics(model: nn.Module, formats: dict[str, str], calibration: list[Inputs], *,
                      cluster_bits: int = 0, clustered: Iterable[str] = ()) -> nn.Module:
    """Round ``model``'s weights (in place) as its layers' formats store them, and return it
    with hooks that round each layer's inputs as its format computes them: int8 weights per
    output channel (symmetric); int8 static activations per tensor (asymmetric, ranges read
    on ``calibration``), int8 dynamic ones per call; bf16 weights and activations to bf16;
    ``cluster_bits`` k-means codebooks of shared weights on the layers named in
    ``clustered``."""
    layers, clustered = dict(weight_layers(model)), set(clustered)
    with torch.no_grad():
        for name, fmt in formats.items():
            weight = layers[name].weight
            if fmt in ("int8", "int8_dynamic", "int8_weight"):
                weight.copy_(_int8_per_channel(weight))
            elif cluster_bits and name in clustered:
                weight.copy_(_kmeans(weight, 2 ** cluster_bits))
            if fmt == "bf16":
                weight.copy_(weight.bfloat16().float())
    ranges = _activation_ranges(model, layers, formats, calibration)
    for name, fmt in formats.items():
        if fmt in ("bf16", "int8", "int8_dynamic"):
            layers[name].register_forward_pre_hook(_input_rounding(fmt, ranges.get(name)))
    return model


def _int8_per_channel(weight: torch.Tensor) -> torch.Tensor:
    flat = weight.reshape(weight.shape[0], -1)
    scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    return ((flat / scale).round().clamp(-127, 127) * scale).reshape(weight.shape)


def _kmeans(weight: torch.Tensor, clusters: int) -> torch.Tensor:
    """``weight`` with each value replaced by the nearest of ``clusters`` centroids found by
    Lloyd's iterations from the value quantiles (one-dimensional k-means)."""
    values = weight.reshape(-1)
    centroids = torch.quantile(values[:: max(1, values.numel() // 100_000)],
                               torch.linspace(0, 1, clusters))
    for _ in range(_KMEANS_ITERATIONS):
        nearest = (values[:, None] - centroids[None]).abs().argmin(dim=1)
        sums = torch.zeros(clusters).index_add_(0, nearest, values)
        counts = torch.zeros(clusters).index_add_(0, nearest, torch.ones_like(values))
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
    nearest = (values[:, None] - centroids[None]).abs().argmin(dim=1)
    return centroids[nearest].reshape(weight.shape)


def _activation_ranges(model: nn.Module, layers: dict[str, nn.Module],
                       formats: dict[str, str], calibration: list[Inputs]
                       ) -> dict[str, tuple[float, float]]:
    """The (min, max) of each int8 static layer's input over ``calibration``."""
    static = [name for name, fmt in formats.items() if fmt == "int8"]
    if not static:
        return {}
    ranges: dict[str, tuple[float, float]] = {}

    def observer(name: str):
        def hook(_module, inputs):
            x = inputs[0].detach()
            low, high = ranges.get(name, (float("inf"), float("-inf")))
            ranges[name] = (min(low, float(x.min())), max(high, float(x.max())))
        return hook

    with _hooks([layers[n].register_forward_pre_hook(observer(n)) for n in static]):
        with torch.no_grad():
            for x in calibration:
                predict(model, x)
    return ranges


@contextmanager
def _hooks(handles: list):
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _input_rounding(fmt: str, bounds: tuple[float, float] | None):
    def hook(_module, inputs):
        x, rest = inputs[0], inputs[1:]
        if fmt == "bf16":
            return (x.bfloat16().to(x.dtype), *rest)
        low, high = bounds if fmt == "int8" and bounds else (float(x.min()), float(x.max()))
        low, high = min(low, 0.0), max(high, 0.0)
        scale = max(high - low, 1e-12) / 255.0
        zero = round(-low / scale)
        q = (x / scale + zero).round().clamp(0, 255)
        return ((q - zero) * scale, *rest)
    return hook
