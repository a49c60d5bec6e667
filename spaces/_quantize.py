"""Quantization to the recipe's numeric format: bf16, int8 dynamic, int8 static (PT2E, post-
training or quantization-aware), per-channel or per-tensor, with layers kept in float."""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ._config import Config, param
from ._domains import Choice
from ._model_io import Inputs, call, clone, export, logits, predict, to_floating
from ._schemes import (
    ACTIVATIONS,
    GRANULARITIES,
    Activations,
    Granularity,
    Scheme,
    quantize,
    register_scheme,
    scheme,
    scheme_names,
)
from ._structure import run_with_hooks
from ._technique import Context, Technique, register


class Bf16Model(nn.Module):
    """Runs a bf16 copy of a model on float32 inputs and returns its logits in float32.

    Floating-point inputs are cast to bf16, integer ones (token ids) are passed as they are.
    The submodules named in ``keep_float`` stay float32 (their inputs are cast up, their
    outputs back down).
    """

    def __init__(self, model: nn.Module, keep_float: Iterable[str] = ()):
        super().__init__()
        self.model = model.to(torch.bfloat16)
        for name in keep_float:
            self.model.set_submodule(name, _Float32(self.model.get_submodule(name).float()))

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        args = tuple(to_floating(a, torch.bfloat16) for a in args)
        kwargs = {k: to_floating(t, torch.bfloat16) for k, t in kwargs.items()}
        return logits(self.model(*args, **kwargs)).float()


class _Float32(nn.Module):
    """A float32 layer inside a bf16 model."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.float()).to(x.dtype)


def _floating(node: torch.fx.Node) -> bool:
    value = node.meta.get("val")
    return not isinstance(value, torch.Tensor) or value.is_floating_point()


def _float_only_quantizer():
    """The x86 Inductor quantizer, leaving integer arithmetic alone (e.g. the position ids
    RoBERTa computes from its token ids): observers cannot take integer tensors."""
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    class FloatOnly(X86InductorQuantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = super().annotate(model)
            for node in model.graph.nodes:
                annotation = node.meta.get("quantization_annotation")
                if annotation is not None and not all(
                        _floating(n) for n in [node, *annotation.input_qspec_map]):
                    del node.meta["quantization_annotation"]
            return model

    return FloatOnly()


def _quantizer(qat: bool, granularity: str, keep: frozenset[str], activations: str):
    """The x86 Inductor quantizer, per-channel or per-tensor weights, ``keep`` left float,
    uint8 activations with fitted zero points (``asymmetric``) or zero point 127."""
    import torchao.quantization.pt2e as pt2e
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    config = xiq.get_default_x86_inductor_quantization_config(is_qat=qat)
    if granularity == "per_tensor":
        observer = (pt2e.FusedMovingAvgObsFakeQuantize.with_args(
            observer=pt2e.MovingAverageMinMaxObserver, eps=2 ** -12) if qat
            else pt2e.MinMaxObserver.with_args(eps=2 ** -12))
        weight = dataclasses.replace(config.weight, qscheme=torch.per_tensor_symmetric,
                                     ch_axis=None, observer_or_fake_quant_ctr=observer)
        config = dataclasses.replace(config, weight=weight)
    if activations == "symmetric":
        config = dataclasses.replace(config, **{
            role: dataclasses.replace(getattr(config, role), qscheme=torch.per_tensor_symmetric)
            for role in ("input_activation", "output_activation")})
    quantizer = _float_only_quantizer()
    quantizer.set_global(config)
    for name in sorted(keep):
        quantizer.set_module_name_qconfig(name, None)
    return quantizer


def _pt2e_static(model: nn.Module, example_input: Inputs,
                 calibration: list[Inputs], granularity: str,
                 keep: frozenset[str], activations: str) -> nn.Module:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = export_dynamic_batch(copy.deepcopy(model), example_input).module()
        prepared = prepare_pt2e(exported, _quantizer(False, granularity, keep, activations))
        with torch.no_grad():
            for inputs in calibration:
                call(prepared, inputs)
    return _convert(prepared)


def prepare_qat(model: nn.Module, example_input: Inputs, *,
                granularity: str = "per_channel", keep_float: Iterable[str] = (),
                activations: str = "asymmetric") -> torch.fx.GraphModule:
    """The model exported with fake quantization inserted (PT2E ``prepare_qat_pt2e``), in
    train mode, for the fine-tune; ``convert_qat`` turns it into the int8 model. Parameter
    names are those of ``model``."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = export_dynamic_batch(copy.deepcopy(model), example_input).module()
        prepared = prepare_qat_pt2e(exported, _quantizer(True, granularity,
                                                         frozenset(keep_float), activations))
    allow_exported_model_train_eval(prepared)
    prepared.train()
    return prepared


def convert_qat(prepared: torch.fx.GraphModule) -> nn.Module:
    """The int8 model of a model prepared by ``prepare_qat`` (and trained)."""
    prepared.eval()
    return _convert(prepared)


def _convert(prepared: torch.fx.GraphModule) -> nn.Module:
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert_pt2e(prepared)
    weights_per_tensor_as_per_channel(converted)
    drop_unused_attributes(converted)
    allow_exported_model_train_eval(converted)
    converted.eval()
    return converted


def weights_per_tensor_as_per_channel(gm: torch.fx.GraphModule) -> int:
    """Rewrite per-tensor dequantization of constant int8 weights as per-channel dequantization
    with the one scale repeated; return how many were rewritten.

    The values are identical, and Inductor fuses only per-channel weight patterns into
    oneDNN's int8 convolutions and GEMMs: per-tensor weights otherwise run dequantized in
    fp32.
    """
    decomposed = torch.ops.quantized_decomposed
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.target != decomposed.dequantize_per_tensor.default:
            continue
        weight = node.args[0]
        if weight.op != "get_attr":
            continue  # an activation
        owner, attr = _owner(gm, weight.target)
        tensor = getattr(owner, attr)
        if tensor.dtype != torch.int8 or tensor.dim() < 2:
            continue
        scale, zero_point, qmin, qmax, dtype = node.args[1:6]
        channels = tensor.shape[0]
        names = []
        for suffix, value in (("scales", torch.full((channels,), float(scale),
                                                    dtype=torch.float32)),
                              ("zero_points", torch.full((channels,), int(zero_point),
                                                         dtype=torch.int64))):
            name = f"{weight.target.replace('.', '_')}_{suffix}"
            gm.register_buffer(name, value)
            names.append(name)
        with gm.graph.inserting_before(node):
            scales, zero_points = (gm.graph.get_attr(n) for n in names)
            per_channel = gm.graph.call_function(
                decomposed.dequantize_per_channel.default,
                (weight, scales, zero_points, 0, qmin, qmax, dtype), dict(node.kwargs))
        node.replace_all_uses_with(per_channel)
        gm.graph.erase_node(node)
        rewritten += 1
    if rewritten:
        gm.recompile()
    return rewritten


def _owner(gm: torch.fx.GraphModule, name: str) -> tuple[nn.Module, str]:
    """The submodule holding the attribute at dotted ``name``, and the attribute's name."""
    owner_path, _, attr = name.rpartition(".")
    return (gm.get_submodule(owner_path) if owner_path else gm), attr


def export_dynamic_batch(model: nn.Module, example_input: Inputs
                         ) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch dimension (dim 0 of every input tensor).

    A batch of one is traced as two copies, since export specializes size-1 dimensions.
    Raises what ``torch.export`` raises when the model fixes its batch size.
    """
    return export(model, example_input, dynamic=True)


def drop_unused_attributes(gm: torch.fx.GraphModule) -> None:
    """Delete parameters and buffers the graph no longer reads (PT2E keeps the fp32 weights)."""
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if graph_reads(gm, name):
            continue
        delattr(*_owner(gm, name))
    gm.delete_all_unused_submodules()


def graph_reads(gm: torch.fx.GraphModule, name: str) -> bool:
    """Whether the graph reads the parameter or buffer ``name`` (directly or via a submodule)."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and (name == node.target or name.startswith(node.target + ".")):
            return True
        if node.op == "call_module" and name.startswith(node.target + "."):
            return True
    return False


@register_scheme
class Fp32(Scheme):
    name = "fp32"

    def convert(self, model, example_input, calibration, granularity, keep, activations):
        return model


@register_scheme
class Bf16(Scheme):
    name, levels, tolerance = "bf16", 0, 5e-2

    def convert(self, model, example_input, calibration, granularity, keep, activations):
        return Bf16Model(model, keep)


@register_scheme
class Int8Dynamic(Scheme):
    """Linear weights in int8, activations quantized at run time (torchao)."""

    name, integer_weights, levels, tolerance = "int8_dynamic", True, 256, 1e-1

    def convert(self, model, example_input, calibration, granularity, keep, activations):
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        config = Int8DynamicActivationInt8WeightConfig(granularity=torchao_granularity(
            granularity))
        return torchao_quantize(model, config, keep)


@register_scheme
class Int8Static(Scheme):
    """Post-training int8 through PT2E and the x86 Inductor quantizer, calibrated, with a
    dynamic batch dimension (QAT: fake quantization during the fine-tune)."""

    name, integer_weights, calibrated, qat = "int8_static", True, True, True
    levels, tolerance = 256, 1e-1

    def convert(self, model, example_input, calibration, granularity, keep, activations):
        return _pt2e_static(model, example_input, calibration, granularity, keep,
                            activations)


def torchao_granularity(granularity: str):
    from torchao.quantization import PerRow, PerTensor

    return PerRow() if granularity == "per_channel" else PerTensor()


def torchao_quantize(model: nn.Module, config, keep: frozenset[str]) -> nn.Module:
    """torchao's ``quantize_`` on every ``nn.Linear`` not named in ``keep``, in place."""
    from torchao.quantization import quantize_

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, config, filter_fn=lambda m, fqn: type(m) is nn.Linear and fqn not in keep)
    return model


KeepFloat = Literal["none", "first_last", "sensitive"]


@dataclass(frozen=True)
class QuantizationConfig(Config):
    """Numeric format of the deployed model.

    ``granularity`` of integer weights (per output channel or per tensor);
    ``calibration_batches`` for calibrated schemes; ``qat`` trains int8_static with fake
    quantization during the fine-tune, then converts; ``keep_float`` leaves layers at
    float precision (none, first and last, or the most sensitive quarter measured on
    calibration data); static int8 ``activations`` are uint8 with a zero point fitted to
    each tensor (``asymmetric``) or fixed at 127 (``symmetric``, the Intel Neural
    Compressor flow: the same zero point everywhere, a range symmetric around it), which
    some CPUs run faster and others slower.
    """

    scheme: str = param("fp32", choices=scheme_names)
    granularity: Granularity = param("per_channel", choices=GRANULARITIES,
                                     note="integer schemes")
    calibration_batches: int = param(8, low=1, high=1024, integer=True, note="static int8")
    qat: bool = param(False, note="fake quantization during the fine-tune "
                                  "(`int8_static`)")
    keep_float: KeepFloat = param("none", choices=("none", "first_last", "sensitive"))
    activations: Activations = param("asymmetric", choices=ACTIVATIONS,
                                     note="static int8")


@register
class Quantization(Technique):
    """Before the fine-tune, QAT inserts fake quantization; after it (and after weight
    sharing), the model is converted to its scheme, chosen layers kept in float."""

    section, config, order, stage = "quantization", QuantizationConfig, 50, "prepare QAT"
    searched = {"scheme": lambda: Choice(scheme_names())}

    def apply(self, model: nn.Module, config: QuantizationConfig, ctx: Context) -> nn.Module:
        if config.qat:
            return self._prepare_qat(model, config, ctx)
        reference: list[torch.Tensor] = []

        def choose_float(trained: nn.Module, _ctx: Context) -> nn.Module:
            ctx.float_layers = self._float_layers(trained, config, ctx)
            reference.append(_outputs(trained, ctx.example_input))
            return trained

        def convert(trained: nn.Module, _ctx: Context) -> nn.Module:
            compressed = quantize(trained, config.scheme, ctx.example_input,
                                  ctx.calibration_inputs(config.calibration_batches),
                                  granularity=config.granularity, keep_float=ctx.float_layers,
                                  activations=config.activations)
            ctx.facts["quantization_error"] = _relative_error(
                _outputs(compressed, ctx.example_input), reference[0])
            if scheme(config.scheme).calibrated:
                ctx.facts["calibration_batches"] = config.calibration_batches
            self._float_facts(config, ctx)
            return compressed

        ctx.later(65, "float layers", choose_float)
        ctx.later(80, "quantize", convert)
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

        ctx.later(80, "quantize", convert)
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

    def normalize(self, config: QuantizationConfig, sections: dict[str, Any]
                  ) -> QuantizationConfig:
        s = scheme(config.scheme)
        qat = config.qat and s.qat
        rounded = s.levels is not None or sections["weight_sharing"].bits > 0
        return dataclasses.replace(
            config, qat=qat,
            granularity=config.granularity if s.integer_weights else "per_channel",
            calibration_batches=config.calibration_batches if s.calibrated and not qat else 8,
            activations=config.activations if s.calibrated else "asymmetric",
            keep_float=config.keep_float if rounded else "none")

    def label(self, config: QuantizationConfig) -> str:
        text = config.scheme + ("_qat" if config.qat else "")
        text += "/tensor" if config.granularity == "per_tensor" else ""
        text += "/sym" if config.activations == "symmetric" else ""
        return text + (f" keep={config.keep_float}" if config.keep_float != "none" else "")


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


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    error = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
    if not math.isfinite(error):
        raise FloatingPointError(f"the quantized model's outputs are not finite ({error})")
    return round(error, 6)


_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def float_layers(model: nn.Module, example_input: Inputs, rule: str,
                 inputs: list[Inputs], scheme_name: str, cluster_bits: int) -> list[str]:
    """Names of the Linear / Conv layers kept at float precision under ``rule``.

    ``first_last``: the first and the last layer called. ``sensitive``: the quarter of the
    layers (at least one) whose weights alone, rounded to the target precision (the
    scheme's integer levels per channel, bf16, or ``cluster_bits`` uniform levels), change
    the model's outputs on ``inputs`` the most. ``none``: no layer.
    """
    if rule == "none":
        return []
    order: list[nn.Module] = []
    run_with_hooks(model, [m for m in model.modules() if isinstance(m, _LAYERS)],
                   lambda mod, _i, _o: order.append(mod), example_input)
    names = {m: n for n, m in model.named_modules()}
    called = list(dict.fromkeys(order))
    if rule == "first_last":
        return sorted({names[called[0]], names[called[-1]]}) if called else []
    if rule != "sensitive":
        raise ValueError(f"keep_float must be 'none', 'first_last' or 'sensitive'. "
                         f"Got {rule!r} instead.")
    levels = 2 ** cluster_bits if cluster_bits else scheme(scheme_name).levels
    with torch.no_grad():
        reference = [predict(model, x).float() for x in inputs]
        scores = []
        for layer in called:
            original = layer.weight.detach().clone()
            layer.weight.copy_(_rounded(original, levels))
            error = sum(_relative_error(predict(model, x).float(), ref)
                        for x, ref in zip(inputs, reference, strict=True))
            layer.weight.copy_(original)
            scores.append(error)
    count = max(1, math.ceil(len(called) / 4))
    ranked = sorted(range(len(called)), key=lambda i: -scores[i])[:count]
    return sorted(names[called[i]] for i in ranked)


def _rounded(weight: torch.Tensor, levels: int | None) -> torch.Tensor:
    """``weight`` rounded as the target precision would (a cheap sensitivity proxy):
    ``levels`` uniform levels per output channel, bf16 for 0, unchanged for None."""
    if levels is None:
        return weight
    if levels == 0:
        return weight.to(torch.bfloat16).float()
    rows = weight.reshape(weight.shape[0], -1)
    scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / (levels / 2 - 0.5)
    return (torch.round(rows / scale) * scale).reshape(weight.shape)
