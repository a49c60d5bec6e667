"""What can be done to a model: each technique's configuration and how a Recipe is applied."""

from ._apply import compress, count_parameters, float_layers
from ._attention import UnfusedAttention, prune_heads
from ._cluster import CLUSTERED_MODULES, ClusteredConv2d, ClusteredLinear, cluster_weights
from ._distill import BudgetExceeded, Deadline, distill, distillation_loss
from ._lowrank import factorize, factorize_conv2d, factorize_linear, factorize_tucker2, rank_for
from ._quantize import Bf16Model, convert_qat, export_dynamic_batch, prepare_qat, quantize
from ._recipe import (
    QUANT_SCHEMES,
    DistillationConfig,
    LowRankConfig,
    PruningConfig,
    QuantizationConfig,
    QuantScheme,
    Recipe,
    SparsityConfig,
    StudentConfig,
)
from ._space import DEFAULT_DOMAINS, Choice, Fixed, FloatRange, SearchSpace
from ._sparse import (
    SPARSE_MODULES,
    SparseConv2d,
    SparseLinear,
    StoredWeight,
    densify,
    sparsify,
)
from ._structure import (
    derive_student,
    drop_blocks,
    output_layers,
    prune_channels,
    repeated_blocks,
    sensitivity_ratios,
)
from ._unstructured import Sparsifier

__all__ = [
    "CLUSTERED_MODULES",
    "DEFAULT_DOMAINS",
    "QUANT_SCHEMES",
    "SPARSE_MODULES",
    "Bf16Model",
    "BudgetExceeded",
    "Choice",
    "ClusteredConv2d",
    "ClusteredLinear",
    "Deadline",
    "DistillationConfig",
    "Fixed",
    "FloatRange",
    "LowRankConfig",
    "PruningConfig",
    "QuantScheme",
    "QuantizationConfig",
    "Recipe",
    "SearchSpace",
    "SparseConv2d",
    "SparseLinear",
    "StoredWeight",
    "Sparsifier",
    "SparsityConfig",
    "StudentConfig",
    "UnfusedAttention",
    "cluster_weights",
    "compress",
    "convert_qat",
    "count_parameters",
    "densify",
    "derive_student",
    "distill",
    "distillation_loss",
    "drop_blocks",
    "export_dynamic_batch",
    "factorize",
    "factorize_conv2d",
    "factorize_linear",
    "factorize_tucker2",
    "float_layers",
    "output_layers",
    "prepare_qat",
    "prune_channels",
    "prune_heads",
    "quantize",
    "rank_for",
    "repeated_blocks",
    "sensitivity_ratios",
    "sparsify",
]
