"""Quantization to the recipe's numeric format: bf16, int8 dynamic, int8 static (PT2E, post-
training or quantization-aware), per-channel or per-tensor, with layers kept in float."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from ._recipe import QuantScheme


class Bf16Model(nn.Module):
    """Runs a bf16 copy of a model on float32 inputs and returns float32 outputs.

    The submodules named in ``keep_float`` stay float32 (their inputs are cast up, their
    outputs back down).
    """

    def __init__(self, model: nn.Module, keep_float: Iterable[str] = ()):
        super().__init__()
        self.model = model.to(torch.bfloat16)
        for name in keep_float:
            self.model.set_submodule(name, _Float32(self.model.get_submodule(name).float()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(torch.bfloat16)).float()


class _Float32(nn.Module):
    """A float32 layer inside a bf16 model."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.float()).to(x.dtype)


def quantize(model: nn.Module, scheme: QuantScheme, example_input: torch.Tensor,
             calibration: Iterable | None = None, *, granularity: str = "per_channel",
             keep_float: Iterable[str] = ()) -> nn.Module:
    """Return ``model`` (eval mode) in ``scheme``; the input model may be modified.

    ``int8_static`` is post-training quantization through PT2E with the x86 Inductor
    quantizer, calibrated on the inputs of ``calibration`` batches, with a dynamic batch
    dimension; ``int8_dynamic`` quantizes Linear weights to int8 and activations at run
    time (torchao; ``nn.MultiheadAttention``'s own projection stays float); ``bf16``
    casts weights and activations. ``granularity`` of int8 weights is ``per_channel``
    (per output channel / row) or ``per_tensor``; the layers named in ``keep_float``
    (module names of ``model``) stay in float.
    """
    model.eval()
    keep = frozenset(keep_float)
    if granularity not in ("per_channel", "per_tensor"):
        raise ValueError(f"granularity must be 'per_channel' or 'per_tensor'. "
                         f"Got {granularity!r} instead.")
    if scheme == "fp32":
        return model
    if scheme == "bf16":
        return Bf16Model(model, keep)
    if scheme == "int8_dynamic":
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            PerRow,
            PerTensor,
            quantize_,
        )

        config = Int8DynamicActivationInt8WeightConfig(
            granularity=PerRow() if granularity == "per_channel" else PerTensor())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(model, config,
                      filter_fn=lambda m, fqn: type(m) is nn.Linear and fqn not in keep)
        return model
    if scheme == "int8_static":
        return _pt2e_static(model, example_input, calibration, granularity, keep)
    raise ValueError(f"unknown quantization scheme {scheme!r}")


def _quantizer(qat: bool, granularity: str, keep: frozenset[str]):
    """The x86 Inductor quantizer, per-channel or per-tensor weights, ``keep`` left float."""
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
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(config)
    for name in sorted(keep):
        quantizer.set_module_name_qconfig(name, None)
    return quantizer


def _pt2e_static(model: nn.Module, example_input: torch.Tensor, calibration: Iterable | None,
                 granularity: str, keep: frozenset[str]) -> nn.Module:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = export_dynamic_batch(copy.deepcopy(model), example_input).module()
        prepared = prepare_pt2e(exported, _quantizer(False, granularity, keep))
        with torch.no_grad():
            for inputs in _calibration_inputs(calibration, example_input):
                prepared(inputs)
    return _convert(prepared)


def prepare_qat(model: nn.Module, example_input: torch.Tensor, *,
                granularity: str = "per_channel", keep_float: Iterable[str] = ()
                ) -> torch.fx.GraphModule:
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
                                                         frozenset(keep_float)))
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


def export_dynamic_batch(model: nn.Module, example_input: torch.Tensor
                         ) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch dimension (dim 0).

    A batch of one is traced as two copies, since export specializes size-1 dimensions.
    Raises what ``torch.export`` raises when the model fixes its batch size.
    """
    if example_input.shape[0] == 1:
        example_input = example_input.expand(2, *example_input.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    return torch.export.export(model, (example_input,), dynamic_shapes=({0: batch},))


def _calibration_inputs(calibration: Iterable | None, example_input: torch.Tensor):
    if calibration is None:
        yield example_input
        return
    for batch in calibration:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def drop_unused_attributes(gm: torch.fx.GraphModule) -> None:
    """Delete parameters and buffers the graph no longer reads (PT2E keeps the fp32 weights)."""
    from ..evaluators import graph_reads

    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if graph_reads(gm, name):
            continue
        delattr(*_owner(gm, name))
    gm.delete_all_unused_submodules()
