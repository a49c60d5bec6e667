"""Lowering a compressed model to compiled execution on the CPU target, checked against eager."""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

from ..spaces import model_io, scheme, scheme_names

Lowering = Literal["aoti", "compile"]
LOWERINGS: tuple[str, ...] = get_args(Lowering)
relative_error = model_io.relative_error  # written once, in spaces; offered here too

# Largest relative output difference (max |lowered - eager| / max |eager|) accepted per scheme.
TOLERANCE = {name: scheme(name).tolerance for name in scheme_names()}


def register_quantized_ops() -> None:
    """Register the torchao operators that saved int8 programs call (their import does)."""
    import torchao.quantization  # noqa: F401
    import torchao.quantization.pt2e  # noqa: F401


class LoweringError(RuntimeError):
    """The lowered model is wrong: its outputs differ from eager or it mutated its input."""


@dataclass
class Lowered:
    """A callable running the model through compiled kernels, and how it was obtained."""

    fn: Callable  # takes the inputs as the model does (``model_io.call``)
    backend: str
    compile_seconds: float
    max_relative_error: float


def lower(model: nn.Module | torch.export.ExportedProgram, example_input: model_io.Inputs,
          scheme: str, backend: Lowering = "aoti", *, package: str | Path | None = None,
          ) -> Lowered:
    """Compile ``model`` with Inductor, weights frozen as constants, for ``example_input``'s shape.

    ``model`` is a module or an exported program (compiled as it is). ``aoti`` compiles
    ahead of time (``torch.export`` then AOTInductor) into a package run without
    Python-level guards: the lowest per-call overhead, and unaffected by later
    ``torch._dynamo.reset()`` calls. With ``package``, the AOTInductor package is written
    there, or loaded from there when it already exists (the caller keys the path by model,
    shape, threads and machine). ``compile`` is ``torch.compile``; the caller then resets
    dynamo between unrelated models. The caller fixes the thread count (compiled code
    specializes on it). Raises LoweringError when the compiled outputs differ from eager
    beyond the scheme's tolerance or the input is modified in place.
    """
    if backend not in LOWERINGS:
        raise ValueError(f"Unknown lowering backend {backend!r}; valid: {list(LOWERINGS)}.")
    if isinstance(model, torch.export.ExportedProgram):
        eager = model.module()  # traced in eval mode already; eval() is not supported
    else:
        eager = model
        eager.eval()
    with torch.no_grad():
        expected = model_io.predict(eager, model_io.clone(example_input))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if backend == "aoti":
            compiled = _aoti(model, example_input, package)
        else:
            compiled = _jit(eager, example_input)
        probe = model_io.clone(example_input)
        with torch.no_grad():
            output = model_io.predict(compiled, probe)
    seconds = time.perf_counter() - start
    if not model_io.equal(probe, example_input):
        raise LoweringError("the compiled model modified its input in place")
    error = relative_error(output, expected)
    if not error <= TOLERANCE[scheme]:
        raise LoweringError(
            f"compiled outputs differ from eager by {error:.3g} (relative), above the "
            f"{scheme} tolerance {TOLERANCE[scheme]:g}"
        )
    with torch.no_grad():
        again = model_io.predict(compiled, model_io.clone(example_input))
    if not torch.allclose(again, output, rtol=1e-4, atol=1e-5):
        raise LoweringError("the compiled model gives different outputs on repeated calls")
    return Lowered(compiled, backend, seconds, error)


def _jit(model: nn.Module, example_input: model_io.Inputs) -> Callable:
    with torch._inductor.config.patch(freezing=True):
        compiled = torch.compile(model, fullgraph=False, dynamic=False)
        with torch.no_grad():  # compile now, under the freezing setting
            model_io.call(compiled, model_io.clone(example_input))
    return compiled


_PACKAGES: Path | None = None
_COUNTER = itertools.count()


def _package_dir() -> Path:
    global _PACKAGES
    if _PACKAGES is None:
        _PACKAGES = Path(tempfile.mkdtemp(prefix="paretoslim-aoti-"))
        atexit.register(shutil.rmtree, _PACKAGES, ignore_errors=True)
    return _PACKAGES


def _aoti(model: nn.Module | torch.export.ExportedProgram, example_input: model_io.Inputs,
          package: str | Path | None) -> Callable:
    path = Path(package) if package is not None else None
    if path is None or not path.is_file():
        with torch.no_grad():
            program = (model if isinstance(model, torch.export.ExportedProgram)
                       else model_io.export(model, example_input))
            scratch = _package_dir() / f"model-{next(_COUNTER)}.pt2"
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(scratch), inductor_configs={"freezing": True})
        if path is None:
            path = scratch
        else:  # publish whole, so a concurrent reader never sees a partial package
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = f"{path}.{os.getpid()}.partial"
            shutil.copyfile(scratch, partial)
            os.replace(partial, path)
    return torch._inductor.aoti_load_package(str(path))
