"""Weight-only int8: Linear weights stored in int8 (per channel or per tensor), activations
and arithmetic in float, through torchao's ``Int8WeightOnlyConfig``.

int4 is not offered: torchao 0.18's ``Int4WeightOnlyConfig`` has no CPU kernel (its
packing formats need mslk / CUDA or bf16 CUDA tiles), and ``IntxWeightOnlyConfig`` stores
int4 values in int8 bytes, neither smaller nor faster than int8.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._quantize import torchao_granularity, torchao_quantize
from ._schemes import Granularity, Scheme, SchemeConfig, register_scheme


@dataclass(frozen=True)
class Int8WeightOnlyConfig(SchemeConfig):
    """int8 weights (per channel or per tensor) of the layers ``layers`` accepts (plain
    ``nn.Linear``)."""

    granularity: Granularity = "per_channel"


@register_scheme
class Int8WeightOnly(Scheme):
    name, config, integer_weights = "int8_weight_only", Int8WeightOnlyConfig, True
    levels, tolerance = 256, 1e-1

    def convert(self, model, config, calibration):
        import torchao.quantization as ao

        return torchao_quantize(model, ao.Int8WeightOnlyConfig(
            granularity=torchao_granularity(config.granularity)), config.layers)
