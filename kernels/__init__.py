"""How fast it runs: lowering compressed models to compiled kernels on a named target."""

if "." not in __name__:  # this folder, imported by its own name from a checkout on sys.path
    from paretoslim.spaces._aside import step_aside

    __package__ = step_aside(__name__, __path__[0])

from ._lower import (
    LOWERINGS,
    TOLERANCE,
    Lowered,
    Lowering,
    LoweringError,
    lower,
    register_quantized_ops,
    relative_error,
)
from ._sparse import dense_execution, sparse_execution, sparse_layers
from ._target import TARGETS, Target, detect_target

__all__ = [
    "LOWERINGS",
    "TARGETS",
    "TOLERANCE",
    "Lowered",
    "Lowering",
    "LoweringError",
    "Target",
    "dense_execution",
    "detect_target",
    "lower",
    "register_quantized_ops",
    "relative_error",
    "sparse_execution",
    "sparse_layers",
]
