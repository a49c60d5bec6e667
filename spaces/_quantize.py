"""Quantization to the recipe's numeric format: the schemes (bf16, int8 dynamic, int8 static
through PT2E, post-training or quantization-aware) and the technique that applies them, per
channel or per tensor, with layers kept in float."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ._bf16 import Bf16Layer, Bf16Model
from ._config import Config, param
from ._domains import Choice
from ._model_io import Inputs, clone, predict
from ._numerics import SCHEME_FORMATS, kind_formats, layer_formats
from ._pt2e import convert_qat, prepare_qat, pt2e_static
from ._schemes import (
    ACTIVATIONS,
    GRANULARITIES,
    Activations,
    Granularity,
    LayerFilter,
    Scheme,
    SchemeConfig,
    every_layer,
    kept_layers,
    quantize,
    register_scheme,
    scheme,
    scheme_names,
)
from ._sensitivity import float_layers, output_error
from ._technique import Context, Phase, Technique, register


@dataclass(frozen=True)
class Fp32Config(SchemeConfig):
    """The model as it is."""


@register_scheme
class Fp32(Scheme):
    name, config = "fp32", Fp32Config

    def convert(self, model, config, calibration):
        return model


@dataclass(frozen=True)
class Bf16Config(SchemeConfig):
    """The whole model in bf16; the outermost modules ``layers`` rejects stay float32."""

    layers: LayerFilter = dataclasses.field(default=every_layer, kw_only=True)


@register_scheme
class Bf16(Scheme):
    name, config, levels, tolerance = "bf16", Bf16Config, 0, 5e-2

    def convert(self, model, config, calibration):
        return Bf16Model(model, kept_layers(model, config.layers))


@dataclass(frozen=True)
class Int8DynamicConfig(SchemeConfig):
    """int8 weights (per channel or per tensor) and int8 activations quantized at run time,
    in the layers ``layers`` accepts (plain ``nn.Linear``)."""

    granularity: Granularity = "per_channel"


@register_scheme
class Int8Dynamic(Scheme):
    """Linear weights in int8, activations quantized at run time (torchao)."""

    name, config, integer_weights, levels = "int8_dynamic", Int8DynamicConfig, True, 256
    tolerance = 1e-1

    def convert(self, model, config, calibration):
        import torchao.quantization as ao

        return torchao_quantize(model, ao.Int8DynamicActivationInt8WeightConfig(
            granularity=torchao_granularity(config.granularity)), config.layers)


@dataclass(frozen=True)
class Int8StaticConfig(SchemeConfig):
    """int8 weights (per channel or per tensor) and uint8 activations (zero points fitted or
    fixed at 127) wherever the x86 Inductor quantizer places them; the outermost modules
    ``layers`` rejects stay float."""

    granularity: Granularity = "per_channel"
    activations: Activations = "asymmetric"
    layers: LayerFilter = dataclasses.field(default=every_layer, kw_only=True)


@register_scheme
class Int8Static(Scheme):
    """Post-training int8 through PT2E and the x86 Inductor quantizer, calibrated, with a
    dynamic batch dimension (QAT: fake quantization during the fine-tune)."""

    name, config, integer_weights, calibrated = "int8_static", Int8StaticConfig, True, True
    qat, levels, tolerance = True, 256, 1e-1

    def convert(self, model, config, calibration):
        keep = frozenset(kept_layers(model, config.layers))
        return pt2e_static(model, calibration.example_input, calibration.batches,
                           config.granularity, keep, config.activations)


def torchao_granularity(granularity: str):
    from torchao.quantization import PerRow, PerTensor

    return PerRow() if granularity == "per_channel" else PerTensor()


def torchao_quantize(model: nn.Module, config, layers: LayerFilter) -> nn.Module:
    """torchao's ``quantize_`` with ``config`` on the layers ``layers`` accepts, in place."""
    from torchao.quantization import quantize_

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, config, filter_fn=layers)
    return model


KeepFloat = Literal["none", "first_last", "sensitive"]
KindFormat = Literal["scheme", "bf16", "fp32"]
KIND_FORMATS = ("scheme", "bf16", "fp32")


@dataclass(frozen=True)
class QuantizationConfig(Config):
    """Numeric format of the deployed model.

    ``granularity`` of integer weights (per output channel or per tensor);
    ``calibration_batches`` for calibrated schemes; ``qat`` trains int8_static with fake
    quantization during the fine-tune, then converts; ``keep_float`` leaves layers at
    float precision (none, first and last, or the most sensitive quarter measured on
    calibration data); ``conv`` and ``linear`` give the layers of that kind not kept float
    a format of their own (``scheme``: the scheme's; ``bf16`` or ``fp32``), so that one
    model mixes int8, bf16 and float32 layers; static int8 ``activations`` are uint8 with
    a zero point fitted to each tensor (``asymmetric``) or fixed at 127 (``symmetric``,
    the Intel Neural Compressor flow: the same zero point everywhere, a range symmetric
    around it), which some CPUs run faster and others slower.
    """

    scheme: str = param("fp32", choices=scheme_names)
    granularity: Granularity = param("per_channel", choices=GRANULARITIES,
                                     note="integer schemes")
    calibration_batches: int = param(8, low=1, high=1024, integer=True, note="static int8")
    qat: bool = param(False, note="fake quantization during the fine-tune "
                                  "(`int8_static`)")
    keep_float: KeepFloat = param("none", choices=("none", "first_last", "sensitive"))
    conv: KindFormat = param("scheme", choices=KIND_FORMATS,
                             note="format of the conv layers")
    linear: KindFormat = param("scheme", choices=KIND_FORMATS,
                               note="format of the linear layers")
    activations: Activations = param("asymmetric", choices=ACTIVATIONS,
                                     note="static int8")


@register
class Quantization(Technique):
    """Before the fine-tune, QAT inserts fake quantization; after it (and after weight
    sharing), the model is converted to its scheme, chosen layers kept in float."""

    section, config, stage = "quantization", QuantizationConfig, "prepare QAT"
    phase = Phase.QUANTIZATION_SETUP
    searched = {"scheme": lambda: Choice(scheme_names())}

    def apply(self, model: nn.Module, config: QuantizationConfig, ctx: Context) -> nn.Module:
        if config.qat:
            return self._prepare_qat(model, config, ctx)
        reference: list[torch.Tensor] = []

        def choose_float(trained: nn.Module, _ctx: Context) -> nn.Module:
            ctx.float_layers = self._float_layers(trained, config, ctx)
            ctx.layer_formats = layer_formats(trained, config.scheme, ctx.float_layers,
                                              kind_formats(config))
            reference.append(_outputs(trained, ctx.example_input))
            return trained

        def convert(trained: nn.Module, _ctx: Context) -> nn.Module:
            keep = with_layer_formats(trained, config.scheme, ctx.layer_formats,
                                     ctx.float_layers)
            compressed = quantize(trained, config.scheme, ctx.example_input,
                                  ctx.calibration_inputs(config.calibration_batches),
                                  granularity=config.granularity, keep_float=keep,
                                  activations=config.activations)
            ctx.facts["quantization_error"] = output_error(
                _outputs(compressed, ctx.example_input), reference[0])
            if scheme(config.scheme).calibrated:
                ctx.facts["calibration_batches"] = config.calibration_batches
            self._float_facts(config, ctx)
            return compressed

        ctx.later(Phase.FLOAT_LAYERS, "float layers", choose_float)
        ctx.later(Phase.QUANTIZE, "quantize", convert)
        return model

    def _prepare_qat(self, model: nn.Module, config: QuantizationConfig, ctx: Context
                     ) -> nn.Module:
        if ctx.recipe.distillation.feature_weight > 0:
            raise ValueError("feature distillation cannot run with QAT: the QAT graph exposes "
                             "no layer to read features from; set feature_weight = 0 or "
                             "qat = false")
        if ctx.finetune_steps <= 0:
            raise ValueError("QAT learns its quantization ranges during the fine-tune and "
                             "needs fine-tune steps > 0")
        ctx.float_layers = self._float_layers(model, config, ctx)
        if ctx.float_layers:
            model = _fold_batchnorm(model)
        ctx.needs_training = True

        def convert(trained: nn.Module, _ctx: Context) -> nn.Module:
            self._float_facts(config, ctx)
            return convert_qat(trained)

        ctx.later(Phase.QUANTIZE, "quantize", convert)
        return prepare_qat(model, ctx.example_input, granularity=config.granularity,
                           keep_float=ctx.float_layers, activations=config.activations)

    @staticmethod
    def _float_layers(model: nn.Module, config: QuantizationConfig, ctx: Context) -> list[str]:
        inputs = ctx.calibration_inputs(config.calibration_batches)[:2]
        return float_layers(model, ctx.example_input, config.keep_float, inputs,
                            config.scheme, ctx.recipe.weight_sharing.bits)

    @staticmethod
    def _float_facts(config: QuantizationConfig, ctx: Context) -> None:
        if config.keep_float != "none":
            ctx.facts["float_layers"] = ",".join(ctx.float_layers)
            ctx.facts["float_layer_count"] = len(ctx.float_layers)
        for kind, fmt in kind_formats(config).items():
            ctx.facts[f"{kind}_format"] = fmt

    def normalize(self, config: QuantizationConfig, sections: dict[str, Any]
                  ) -> QuantizationConfig:
        s = scheme(config.scheme)
        qat = config.qat and s.qat
        rounded = s.levels is not None or sections["weight_sharing"].bits > 0
        conv, linear = _override(s, config.conv, _CONV), _override(s, config.linear, _LINEAR)
        if qat:  # fake quantization covers the whole graph but the layers kept float
            conv, linear = "scheme", "scheme"
        return dataclasses.replace(
            config, qat=qat,
            granularity=config.granularity if s.integer_weights else "per_channel",
            calibration_batches=config.calibration_batches if s.calibrated and not qat else 8,
            activations=config.activations if s.calibrated else "asymmetric",
            keep_float=config.keep_float if rounded else "none", conv=conv, linear=linear)

    def label(self, config: QuantizationConfig) -> str:
        text = config.scheme + ("_qat" if config.qat else "")
        text += "/tensor" if config.granularity == "per_tensor" else ""
        text += "/sym" if config.activations == "symmetric" else ""
        text += "".join(f" {kind}={fmt}" for kind, fmt in kind_formats(config).items())
        return text + (f" keep={config.keep_float}" if config.keep_float != "none" else "")


_CONV, _LINEAR = nn.Conv2d(1, 1, 1), nn.Linear(1, 1)  # a layer of each kind, to ask a scheme


def _override(s: Scheme, fmt: str, layer: nn.Module) -> str:
    """``fmt`` as a per-kind override under ``s``: ``scheme`` when it is the format ``s``
    gives layers of ``layer``'s kind anyway."""
    own = SCHEME_FORMATS[s.name] if s.config().layers(layer, "") else "fp32"
    return "scheme" if fmt == own else fmt


def with_layer_formats(model: nn.Module, scheme_name: str, formats: dict[str, str],
                      float_names: list[str]) -> list[str]:
    """Put the layers whose ``formats`` (``{layer name: format}``) say bf16 under a scheme
    of another format in bf16 (``model`` is modified); return the layers the scheme must
    leave alone: ``float_names`` and every layer whose format is not the scheme's."""
    own = SCHEME_FORMATS[scheme_name]
    if own != "bf16":
        for name, fmt in formats.items():
            if fmt == "bf16":
                model.set_submodule(name, Bf16Layer(model.get_submodule(name)))
    return list(dict.fromkeys([*float_names, *(n for n, f in formats.items() if f != own)]))


def _fold_batchnorm(model: nn.Module) -> nn.Module:
    """The model with each BatchNorm folded into the convolution before it (torch.fx);
    PT2E's QAT cannot leave a Conv-BatchNorm pair in float otherwise."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model.eval())
    except Exception as exc:
        raise ValueError(f"QAT with float layers folds BatchNorm into convolutions first, and "
                         f"torch.fx could not trace this model: {exc}") from exc


def _outputs(model: nn.Module, x: Inputs) -> torch.Tensor:
    with torch.no_grad():
        return predict(model, clone(x)).float()

