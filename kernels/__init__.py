"""How fast it runs: lowering compressed models to compiled kernels on a named target."""

from ._lower import TOLERANCE, Lowered, LoweringError, lower, relative_error
from ._target import TARGETS, Target, detect_target

__all__ = [
    "TARGETS",
    "TOLERANCE",
    "Lowered",
    "LoweringError",
    "Target",
    "detect_target",
    "lower",
    "relative_error",
]
