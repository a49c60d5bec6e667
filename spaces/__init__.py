"""What can be done to a model: each technique's configuration and how a Recipe is applied."""

from ._apply import compress, count_parameters
from ._distill import BudgetExceeded, Deadline, distill, distillation_loss
from ._lowrank import factorize, factorize_conv2d, factorize_linear
from ._quantize import Bf16Model, export_dynamic_batch, quantize
from ._recipe import (
    QUANT_SCHEMES,
    DistillationConfig,
    LowRankConfig,
    PruningConfig,
    QuantizationConfig,
    QuantScheme,
    Recipe,
    StudentConfig,
)
from ._space import DEFAULT_DOMAINS, Choice, Fixed, FloatRange, SearchSpace
from ._sparse import SPARSE_MODULES, SparseConv2d, SparseLinear, densify, sparsify
from ._structure import derive_student, output_layers, prune_channels

__all__ = [
    "DEFAULT_DOMAINS",
    "QUANT_SCHEMES",
    "Bf16Model",
    "BudgetExceeded",
    "Choice",
    "Deadline",
    "DistillationConfig",
    "Fixed",
    "FloatRange",
    "LowRankConfig",
    "PruningConfig",
    "QuantScheme",
    "QuantizationConfig",
    "Recipe",
    "SPARSE_MODULES",
    "SearchSpace",
    "SparseConv2d",
    "SparseLinear",
    "StudentConfig",
    "compress",
    "count_parameters",
    "densify",
    "derive_student",
    "distill",
    "distillation_loss",
    "export_dynamic_batch",
    "factorize",
    "factorize_conv2d",
    "factorize_linear",
    "output_layers",
    "prune_channels",
    "quantize",
    "sparsify",
]
