"""Quantization to the recipe's numeric format: bf16, int8 dynamic, int8 static (PT2E)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from ._recipe import QuantScheme


class Bf16Model(nn.Module):
    """Runs a bf16 copy of a model on float32 inputs and returns float32 outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(torch.bfloat16)).float()


def quantize(model: nn.Module, scheme: QuantScheme, example_input: torch.Tensor,
             calibration: Iterable | None = None) -> nn.Module:
    """Return ``model`` (eval mode) in ``scheme``; the input model may be modified.

    ``int8_static`` is post-training quantization through PT2E with the x86 Inductor
    quantizer, calibrated on the inputs of ``calibration`` batches, with a dynamic batch
    dimension; ``int8_dynamic`` quantizes Linear weights to int8 and activations at run
    time (torchao); ``bf16`` casts weights and activations.
    """
    model.eval()
    if scheme == "fp32":
        return model
    if scheme == "bf16":
        return Bf16Model(model)
    if scheme == "int8_dynamic":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(model, Int8DynamicActivationInt8WeightConfig())
        return model
    if scheme == "int8_static":
        return _pt2e_static(model, example_input, calibration)
    raise ValueError(f"unknown quantization scheme {scheme!r}")


def _pt2e_static(model: nn.Module, example_input: torch.Tensor,
                 calibration: Iterable | None) -> nn.Module:
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = export_dynamic_batch(copy.deepcopy(model), example_input).module()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for inputs in _calibration_inputs(calibration, example_input):
                prepared(inputs)
        converted = convert_pt2e(prepared)
    drop_unused_attributes(converted)
    allow_exported_model_train_eval(converted)
    return converted


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
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        delattr(owner, attr)
    gm.delete_all_unused_submodules()
