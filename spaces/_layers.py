"""What a layer with weights is, in one place: the kinds every technique prunes, quantizes,
factorizes and counts, and the layers rewritten into one of them before compression."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The layer kinds the techniques and kernels know (the canonical forms)."""

_CANONICAL: dict[tuple[str, str], Callable[[nn.Module], nn.Module]] = {}


def register_weight_layer(module: str, name: str,
                          to_canonical: Callable[[nn.Module], nn.Module]) -> None:
    """Declare the layer class ``module.name`` a layer with weights: ``to_canonical`` builds
    the equivalent layer of one of ``WEIGHT_LAYERS`` (same outputs) that replaces it before
    compression. Classes are named, not imported, so that registering costs no import."""
    _CANONICAL[(module, name)] = to_canonical


def _converter(layer: nn.Module) -> Callable[[nn.Module], nn.Module] | None:
    cls = type(layer)
    return _CANONICAL.get((cls.__module__, cls.__qualname__))


def is_weight_layer(layer: nn.Module) -> bool:
    """A layer of ``WEIGHT_LAYERS`` (or a subclass), or one registered to become one."""
    return isinstance(layer, WEIGHT_LAYERS) or _converter(layer) is not None


def canonicalize(model: nn.Module) -> nn.Module:
    """Replace every registered layer of ``model`` by its canonical form, in place (the
    model itself when it is one); the outputs stay the same. Returns the model."""
    convert = _converter(model)
    if convert is not None:
        return convert(model)
    for name, module in list(model.named_modules()):
        convert = _converter(module)
        if convert is not None and name:
            model.set_submodule(name, convert(module))
    return model


def _transposed_linear(layer: nn.Module) -> nn.Linear:
    """transformers' ``Conv1D`` (GPT-2, GPT, ...): a linear layer whose weight is stored
    ``(in, out)`` and computed with ``addmm``. The weight is transposed once."""
    weight = layer.weight.detach()
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=layer.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if layer.bias is not None:
            linear.bias.copy_(layer.bias.detach())
    linear.train(layer.training)
    return linear


register_weight_layer("transformers.pytorch_utils", "Conv1D", _transposed_linear)
