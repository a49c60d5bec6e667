"""The forms a task's model inputs, batches and outputs may take, handled in one place.

Inputs are a tensor (one positional argument), a tuple of tensors (positional arguments)
or a dict of tensors (keyword arguments, e.g. Hugging Face's ``input_ids`` and
``attention_mask``). A batch is ``(inputs, targets)`` or a Hugging Face style dict whose
``labels`` entry holds the targets. A model's output is a tensor, a tuple or list (its first
element) or an object or dict with ``logits`` (Hugging Face model outputs).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

Inputs = torch.Tensor | tuple[torch.Tensor, ...] | Mapping[str, torch.Tensor]

LABELS = "labels"


def input_error(inputs: Any) -> str | None:
    """Why ``inputs`` is not a supported input form, or None when it is."""
    if isinstance(inputs, torch.Tensor):
        return None
    if isinstance(inputs, tuple | list):
        if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
            return "a tuple of inputs must hold one or more tensors"
        return None
    if isinstance(inputs, Mapping):
        bad = [k for k, t in inputs.items() if not isinstance(k, str)
               or not isinstance(t, torch.Tensor)]
        if not inputs or bad:
            return "a dict of inputs must map argument names to tensors"
        return None
    return (f"inputs must be a tensor, a tuple of tensors or a dict of tensors, not "
            f"{type(inputs).__name__}")


def call(model: Callable, inputs: Inputs) -> Any:
    """``model`` applied to ``inputs``: positionally, spread or as keyword arguments."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


def logits(output: Any) -> torch.Tensor:
    """The prediction tensor of a model's output (see the module docstring)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    found = getattr(output, "logits", None)
    if isinstance(found, torch.Tensor):
        return found
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"the model returned {type(output).__name__}; expected a tensor, a "
                    "tuple whose first element is one, or an output with logits")


def predict(model: Callable, inputs: Inputs) -> torch.Tensor:
    """The logits ``model`` gives for ``inputs``."""
    return logits(call(model, inputs))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (in float32)."""
    actual, expected = actual.float(), expected.float()
    scale = expected.abs().max().clamp_min(1e-12)
    return ((actual - expected).abs().max() / scale).item()


def split_batch(batch: Any) -> tuple[Inputs, torch.Tensor]:
    """``(inputs, targets)`` of one batch in either batch form."""
    if isinstance(batch, Mapping):
        if LABELS not in batch:
            raise ValueError(f"a dict batch needs a {LABELS!r} entry holding its targets "
                             f"(found {sorted(batch)})")
        return {k: v for k, v in batch.items() if k != LABELS}, batch[LABELS]
    inputs, targets = batch
    return (tuple(inputs) if isinstance(inputs, list) else inputs), targets


def batch_inputs(item: Any) -> Inputs:
    """The inputs of a calibration item: a batch in either form, or bare inputs (a tensor,
    or a dict without ``labels``)."""
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, Mapping) and LABELS not in item:
        return dict(item)
    return split_batch(item)[0]


def pairs(batches: Iterable) -> Iterator[tuple[Inputs, torch.Tensor]]:
    """The batches of ``batches`` as ``(inputs, targets)``."""
    return (split_batch(batch) for batch in batches)


def tensors(inputs: Inputs) -> list[torch.Tensor]:
    """The tensors of ``inputs``, in argument order."""
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    return list(inputs.values() if isinstance(inputs, Mapping) else inputs)


def map_tensors(inputs: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    """``inputs`` with ``fn`` applied to each tensor, in the same form."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {k: fn(t) for k, t in inputs.items()}
    return tuple(fn(t) for t in inputs)


def clone(inputs: Inputs) -> Inputs:
    """A copy of ``inputs`` sharing no storage with it."""
    return map_tensors(inputs, lambda t: t.clone())


def equal(a: Inputs, b: Inputs) -> bool:
    """Whether two inputs of the same form hold equal tensors."""
    left, right = tensors(a), tensors(b)
    return len(left) == len(right) and all(
        torch.equal(x, y) for x, y in zip(left, right, strict=True))


def to_floating(inputs: Inputs, dtype: torch.dtype) -> Inputs:
    """``inputs`` with its floating-point tensors cast to ``dtype``; token ids and other
    integer tensors are left as they are."""
    return map_tensors(inputs, lambda t: t.to(dtype) if t.is_floating_point() else t)


def batch_size(inputs: Inputs) -> int:
    """The size of the leading (batch) dimension of ``inputs``."""
    return int(tensors(inputs)[0].shape[0])


def with_batch(inputs: Inputs, size: int) -> Inputs:
    """``inputs`` with ``size`` rows, repeating its rows as needed (a fresh copy)."""
    def resize(t: torch.Tensor) -> torch.Tensor:
        repeats = -(-size // t.shape[0])
        return t.repeat(repeats, *([1] * (t.dim() - 1)))[:size].clone()
    return map_tensors(inputs, resize)


def token_like(t: torch.Tensor) -> bool:
    """Whether ``t`` holds one row of tokens per example: 2-D and integral (token ids,
    attention masks, token types)."""
    return t.dim() == 2 and not t.is_floating_point()


def with_sequence(inputs: Inputs, length: int) -> Inputs:
    """``inputs`` with its token tensors (``token_like``) cut or repeated along dim 1 to
    ``length`` (a fresh copy)."""
    def resize(t: torch.Tensor) -> torch.Tensor:
        if not token_like(t):
            return t.clone()
        repeats = -(-length // t.shape[1])
        return t.repeat(1, repeats)[:, :length].clone()
    return map_tensors(inputs, resize)


def shapes(inputs: Inputs) -> str:
    """The shapes of ``inputs`` as messages and model cards name them: ``(2, 3)``, or
    ``input_ids (1, 40), attention_mask (1, 40)``."""
    if isinstance(inputs, Mapping):
        return ", ".join(f"{k} {tuple(t.shape)}" for k, t in inputs.items())
    return ", ".join(str(tuple(t.shape)) for t in tensors(inputs))


def signature(inputs: Inputs) -> tuple:
    """Names, shapes and dtypes of ``inputs``: what a compiled program is specialised to."""
    if isinstance(inputs, Mapping):
        return tuple((k, tuple(t.shape), str(t.dtype)) for k, t in inputs.items())
    return tuple((tuple(t.shape), str(t.dtype)) for t in tensors(inputs))


def export_arguments(inputs: Inputs) -> tuple[tuple, dict[str, torch.Tensor]]:
    """``(args, kwargs)`` for ``torch.export.export``."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    return tuple(inputs), {}


class LogitsOnly(nn.Module):
    """``model`` returning only its logits (see ``logits``): a program of it loads and runs
    without the library that defined the model's output class. Made by ``logits_only``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


def logits_only(model: nn.Module) -> LogitsOnly:
    """``model`` wrapped in a ``LogitsOnly`` whose forward has the model's own parameters
    (``torch.export`` keys dynamic shapes and keyword inputs by them)."""

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        return logits(self.model(*args, **kwargs))

    forward.__signature__ = inspect.signature(type(model).forward)
    kind = type(f"LogitsOnly{type(model).__name__}", (LogitsOnly,), {"forward": forward})
    return kind(model)


def export(model: nn.Module, inputs: Inputs, *, dynamic: bool = False,
           sequence: bool = False) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` on ``inputs``, returning its logits alone (a
    model with another output is wrapped by ``logits_only``); with ``dynamic``, the batch
    dimension of every tensor is symbolic, and with ``sequence`` also dimension 1 of every
    2-D integer tensor (token ids, attention masks). A batch of one is widened to two first,
    as export specialises dimensions of size one."""
    with torch.no_grad():
        if not isinstance(call(model, clone(inputs)), torch.Tensor):
            model = logits_only(model)
    if not dynamic:
        args, kwargs = export_arguments(clone(inputs))
        return torch.export.export(model, args, kwargs)
    if batch_size(inputs) == 1:
        inputs = with_batch(inputs, 2)
    else:
        inputs = clone(inputs)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    length = torch.export.Dim.AUTO  # its range as the model allows (position tables)

    def dims(t: torch.Tensor) -> dict[int, Any]:
        found: dict[int, Any] = {0: batch}
        if sequence and token_like(t) and t.shape[1] > 1:
            found[1] = length
        return found

    args, kwargs = export_arguments(inputs)
    shapes: Any = tuple(dims(t) for t in args)
    if kwargs:
        shapes = {k: dims(t) for k, t in kwargs.items()}
    return torch.export.export(model, args, kwargs, dynamic_shapes=shapes)
