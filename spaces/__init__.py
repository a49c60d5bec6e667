"""What can be done to a model: the registered techniques, their configs (the Recipe's
sections), the joint search space and ``compress``, which applies a Recipe."""

if "." not in __name__:  # this folder, imported by its own name from a checkout on sys.path
    from paretoslim.spaces._aside import step_aside

    __package__ = step_aside(__name__, __path__[0])

# Technique modules register themselves on import, in this order of files; the pipeline
# order is each technique's ``phase``.
from ._student import StudentConfig  # isort: skip
from ._pruning import PruningConfig  # isort: skip
from ._lowrank import LowRankConfig  # isort: skip
from ._unstructured import Sparsifier, SparsityConfig  # isort: skip
from ._quantize import QuantizationConfig, with_layer_formats  # isort: skip
from ._distill import DistillationConfig  # isort: skip
from ._cluster import WeightSharingConfig  # isort: skip
from ._embedding import EmbeddingConfig, compress_embeddings  # isort: skip
from ._weight_only import Int8WeightOnly  # noqa: F401  isort: skip
from . import _model_io as model_io  # inputs, batches and outputs in every form
from ._allocation import sensitivity_ratios
from ._apply import compress
from ._attention import UnfusedAttention
from ._bf16 import Bf16Model
from ._cluster import CLUSTERED_MODULES, ClusteredConv2d, ClusteredLinear, cluster_weights
from ._config import Config, check_range, param
from ._distill import distill
from ._domains import Choice, Domain, Fixed, FloatRange
from ._elastic import ElasticStudent, sliceable
from ._heads import prune_heads
from ._layers import WEIGHT_LAYERS, canonicalize, is_weight_layer, register_weight_layer
from ._lowrank import factorize, factorize_conv2d, factorize_linear, factorize_tucker2, rank_for
from ._numerics import (
    SCHEME_FORMATS,
    kind_formats,
    layer_formats,
    shared_weight_layers,
    simulate_numerics,
    weight_layers,
)
from ._progress import PhaseProgress
from ._pt2e import convert_qat, export_dynamic_batch, graph_reads, prepare_qat
from ._readme import parameter_table
from ._recipe import Recipe
from ._schemes import Scheme, SchemeConfig, quantize, register_scheme, scheme, scheme_names
from ._sensitivity import float_layers
from ._space import SearchSpace, default_domains
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
    layer_groups,
    output_layers,
    prune_channels,
    repeated_blocks,
)
from ._technique import Context, Phase, Technique, register, technique, techniques
from ._training import (
    BudgetExceeded,
    Deadline,
    FineTuneWatch,
    Verdict,
    count_parameters,
    distillation_loss,
)

DEFAULT_DOMAINS = default_domains()  # the registry's defaults once every technique is in
QUANT_SCHEMES = scheme_names()

__all__ = [
    "PhaseProgress",
    "CLUSTERED_MODULES",
    "DEFAULT_DOMAINS",
    "QUANT_SCHEMES",
    "SPARSE_MODULES",
    "WEIGHT_LAYERS",
    "canonicalize",
    "is_weight_layer",
    "register_weight_layer",
    "Bf16Model",
    "model_io",
    "BudgetExceeded",
    "Choice",
    "Config",
    "ClusteredConv2d",
    "ClusteredLinear",
    "Context",
    "Deadline",
    "DistillationConfig",
    "ElasticStudent",
    "EmbeddingConfig",
    "Domain",
    "Fixed",
    "FineTuneWatch",
    "FloatRange",
    "LowRankConfig",
    "Phase",
    "PruningConfig",
    "QuantizationConfig",
    "Recipe",
    "Scheme",
    "SchemeConfig",
    "SearchSpace",
    "SparseConv2d",
    "SparseLinear",
    "Sparsifier",
    "SparsityConfig",
    "StoredWeight",
    "StudentConfig",
    "Technique",
    "UnfusedAttention",
    "Verdict",
    "WeightSharingConfig",
    "check_range",
    "cluster_weights",
    "compress",
    "compress_embeddings",
    "convert_qat",
    "count_parameters",
    "default_domains",
    "densify",
    "derive_student",
    "distill",
    "distillation_loss",
    "drop_blocks",
    "layer_groups",
    "export_dynamic_batch",
    "factorize",
    "factorize_conv2d",
    "factorize_linear",
    "factorize_tucker2",
    "float_layers",
    "graph_reads",
    "output_layers",
    "param",
    "parameter_table",
    "prepare_qat",
    "prune_channels",
    "prune_heads",
    "quantize",
    "with_layer_formats",
    "rank_for",
    "register",
    "register_scheme",
    "repeated_blocks",
    "scheme",
    "scheme_names",
    "sensitivity_ratios",
    "sliceable",
    "simulate_numerics",
    "layer_formats",
    "kind_formats",
    "shared_weight_layers",
    "weight_layers",
    "SCHEME_FORMATS",
    "sparsify",
    "technique",
    "techniques",
]
