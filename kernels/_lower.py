"""Lowering a compressed model to compiled execution on the CPU target, checked against eager."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# Largest relative output difference (max |lowered - eager| / max |eager|) accepted per scheme.
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "int8_dynamic": 1e-1, "int8_static": 1e-1}


class LoweringError(RuntimeError):
    """The lowered model is wrong: its outputs differ from eager or it mutated its input."""


@dataclass
class Lowered:
    """A callable running the model through compiled kernels, and how it was obtained."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    backend: str
    compile_seconds: float
    max_relative_error: float


def lower(model: nn.Module, example_input: torch.Tensor, scheme: str) -> Lowered:
    """Compile ``model`` with Inductor (weights frozen as constants) for ``example_input``'s shape.

    The caller fixes the thread count (compiled graphs specialize on it) and calls
    ``torch._dynamo.reset()`` between unrelated models. Raises LoweringError when the
    compiled outputs differ from eager beyond the scheme's tolerance or the input is
    modified in place.
    """
    model.eval()
    with torch.no_grad():
        expected = model(example_input.clone())
    start = time.perf_counter()
    with warnings.catch_warnings(), torch._inductor.config.patch(freezing=True):
        warnings.simplefilter("ignore")
        compiled = torch.compile(model, fullgraph=False, dynamic=False)
        probe = example_input.clone()
        with torch.no_grad():
            output = compiled(probe)
    seconds = time.perf_counter() - start
    if not torch.equal(probe, example_input):
        raise LoweringError("the compiled model modified its input in place")
    error = relative_error(output, expected)
    if not error <= TOLERANCE[scheme]:
        raise LoweringError(
            f"compiled outputs differ from eager by {error:.3g} (relative), above the "
            f"{scheme} tolerance {TOLERANCE[scheme]:g}"
        )
    with torch.no_grad():
        again = compiled(example_input.clone())
    if not torch.allclose(again, output, rtol=1e-4, atol=1e-5):
        raise LoweringError("the compiled model gives different outputs on repeated calls")
    return Lowered(compiled, "inductor", seconds, error)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (in float32)."""
    actual, expected = actual.float(), expected.float()
    scale = expected.abs().max().clamp_min(1e-12)
    return ((actual - expected).abs().max() / scale).item()
