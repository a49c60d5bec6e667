"""Weight-only int8: Linear weights stored in int8 (per channel or per tensor), activations
and arithmetic in float, through torchao's ``Int8WeightOnlyConfig``.

int4 is not offered: torchao 0.18's ``Int4WeightOnlyConfig`` has no CPU kernel (its
packing formats need mslk / CUDA or bf16 CUDA tiles), and ``IntxWeightOnlyConfig`` stores
int4 values in int8 bytes, neither smaller nor faster than int8.
"""

from __future__ import annotations

from ._quantize import torchao_granularity, torchao_quantize
from ._schemes import Scheme, register_scheme


@register_scheme
class Int8WeightOnly(Scheme):
    name, integer_weights, levels, tolerance = "int8_weight_only", True, 256, 1e-1

    def convert(self, model, example_input, calibration, granularity, keep, activations):
        from torchao.quantization import Int8WeightOnlyConfig

        config = Int8WeightOnlyConfig(granularity=torchao_granularity(granularity))
        return torchao_quantize(model, config, keep)
