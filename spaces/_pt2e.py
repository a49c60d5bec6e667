"""PT2E int8 (post-training and quantization-aware): the x86 Inductor quantizer set up for
the recipe, and the rewrites of the converted graph that keep it fast and small."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from ._model_io import Inputs, call, export


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


def pt2e_static(model: nn.Module, example_input: Inputs,
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
