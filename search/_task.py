"""The task a user brings (model, data, metric) and loading it from a factory reference."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..spaces import canonicalize, model_io
from ._errors import ParetoslimError

Metric = Callable[[nn.Module, Iterable], float]
StudentFactory = Callable[[float, float], nn.Module]


@dataclass
class Task:
    """What a search compresses and how quality is judged.

    ``model`` is the trained fp32 teacher; ``train`` and ``val`` are re-iterable collections
    of batches, each ``(inputs, targets)`` or a Hugging Face style dict with a ``labels``
    entry; ``example_input`` is one batch of inputs used for latency and export. Inputs are a
    tensor, a tuple of tensors (positional arguments) or a dict of tensors (keyword
    arguments); the model may return a tensor, a tuple (its first element is the prediction)
    or an output with ``logits``. ``metric(model, val)`` returns a quality where higher is better
    (default: classification accuracy). ``calibration`` holds the batches used to calibrate
    static quantization (default: the first batches of ``train``). ``student(width, depth)``
    builds a task-specific student (default: students are derived from the teacher).
    The model's registered weight layers (transformers' ``Conv1D``) are replaced in place
    by their canonical kind (``nn.Linear``), outputs unchanged, so that the teacher timed
    is the one the techniques compress.
    """

    model: nn.Module
    train: Iterable
    val: Iterable
    example_input: model_io.Inputs
    metric: Metric | None = None
    calibration: Iterable | None = None
    student: StudentFactory | None = None
    name: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TypeError(
                f"Task.model must be a torch.nn.Module. Got {type(self.model).__name__} instead."
            )
        self.model = canonicalize(self.model)
        problem = model_io.input_error(self.example_input)
        if problem is not None:
            raise TypeError(f"Task.example_input: {problem}.")
        if isinstance(self.example_input, list):
            self.example_input = tuple(self.example_input)
        for name in ("metric", "student"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"Task.{name} must be callable. Got {type(value).__name__}.")


def load_task(reference: str, base_dir: Path | None = None, options: dict | None = None) -> Task:
    """Import ``path/to/file.py:factory`` or ``package.module:factory`` and build the Task.

    A relative file path resolves against ``base_dir``. ``options`` are passed to the
    factory as keyword arguments (a plain zero-argument factory is called with none).
    Every failure raises ParetoslimError naming the reference and what to do.
    """
    factory = _resolve_factory(reference, base_dir)
    try:
        task = factory(**(options or {}))
    except ParetoslimError:
        raise
    except Exception as exc:
        raise ParetoslimError(
            f"task {reference!r}: the factory raised {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(task, Task):
        raise ParetoslimError(
            f"task {reference!r}: the factory returned {type(task).__name__}, expected "
            "paretoslim.search.Task (return Task(model=..., train=..., val=..., "
            "example_input=...))"
        )
    check_model_accepts_input(task.model, task.example_input, where=f"task {reference!r}")
    return task


def check_model_accepts_input(model: nn.Module, example_input: model_io.Inputs,
                              where: str) -> None:
    """Run the model once on the example input; raise ParetoslimError if it does not fit."""
    model.eval()
    try:
        with torch.no_grad():
            output = model_io.call(model, example_input)
    except Exception as exc:
        raise ParetoslimError(
            f"{where}: the model cannot run on example_input of shape "
            f"{model_io.shapes(example_input)} "
            f"({type(exc).__name__}: {exc}); make example_input one batch shaped like the "
            "model's real input"
        ) from exc
    try:
        model_io.logits(output)
    except TypeError as exc:
        raise ParetoslimError(f"{where}: {exc}") from None



def _resolve_factory(reference: str, base_dir: Path | None) -> Callable[..., Any]:
    target, sep, attr = reference.rpartition(":")
    if not sep or not target or not attr:
        raise ParetoslimError(
            f"task {reference!r}: expected 'path/to/file.py:make_task' or "
            "'package.module:make_task'"
        )
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise ParetoslimError(f"task {reference!r}: file {path} does not exist")
        module_name = f"paretoslim_task_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ParetoslimError(f"task {reference!r}: cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            raise ParetoslimError(
                f"task {reference!r}: importing {path} raised {type(exc).__name__}: {exc}"
            ) from exc
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise ParetoslimError(
                f"task {reference!r}: cannot import module {target!r} "
                f"({type(exc).__name__}: {exc})"
            ) from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise ParetoslimError(f"task {reference!r}: {target} has no attribute {attr!r}")
    if not callable(factory):
        raise ParetoslimError(f"task {reference!r}: {attr!r} is not callable")
    return factory
