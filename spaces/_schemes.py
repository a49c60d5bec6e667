"""Numeric schemes of the deployed model: each a frozen config saying what, and a handler
registered for that config type saying how a model is converted."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar, Literal, get_args

from torch import nn

from ._model_io import Inputs, batch_inputs

Granularity = Literal["per_channel", "per_tensor"]
Activations = Literal["asymmetric", "symmetric"]
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
ACTIVATIONS: tuple[str, ...] = get_args(Activations)

LayerFilter = Callable[[nn.Module, str], bool]  # (module, its name in the model) -> converted


def linear_layers(module: nn.Module, fqn: str) -> bool:
    """Plain ``nn.Linear`` layers (not subclasses such as the stored weight forms)."""
    return type(module) is nn.Linear


def every_layer(module: nn.Module, fqn: str) -> bool:
    """Every module: the scheme converts the whole model."""
    return True


@dataclass(frozen=True)
class Skipping:
    """A layer filter that converts what ``layers`` converts except the modules named in
    ``names`` and theirs (those stay as they are)."""

    layers: LayerFilter
    names: frozenset[str]

    def __call__(self, module: nn.Module, fqn: str) -> bool:
        return self.layers(module, fqn) and not any(
            fqn == name or fqn.startswith(name + ".") for name in self.names)


@dataclass(frozen=True)
class SchemeConfig:
    """What a scheme converts: the layers ``layers(module, fqn)`` accepts. A scheme's own
    config subclasses it with the options that scheme reads (e.g. ``granularity``) and
    may change the default filter."""

    layers: LayerFilter = field(default=linear_layers, kw_only=True)


@dataclass(frozen=True)
class Calibration:
    """The inputs a conversion may read: ``example_input`` to trace the model with,
    ``batches`` (a list of inputs) to calibrate on."""

    example_input: Inputs
    batches: list[Inputs]


class Scheme:
    """One value of ``quantization.scheme``; a subclass is registered with ``register_scheme``.

    ``config`` is its frozen config class (a ``SchemeConfig``; one scheme per class), and
    ``convert(model, config, calibration)`` returns the model in this scheme (the input
    may be modified), converting the layers ``config.layers`` accepts; for a scheme that
    converts the whole model (``every_layer``), the outermost modules it rejects stay in
    float. ``integer_weights``: the scheme stores its own integer weights (``granularity``
    applies; k-means sharing does not); ``calibrated``: it reads calibration batches;
    ``qat``: it can be trained with fake quantization; ``levels``: the weight levels a
    cheap sensitivity proxy rounds to (0: bf16 rounding; None: none, nothing is rounded);
    ``tolerance``: the largest relative output difference accepted between the lowered
    and the eager model.
    """

    name: ClassVar[str]
    config: ClassVar[type[SchemeConfig]]
    integer_weights: ClassVar[bool] = False
    calibrated: ClassVar[bool] = False
    qat: ClassVar[bool] = False
    levels: ClassVar[int | None] = None
    tolerance: ClassVar[float] = 1e-3

    def convert(self, model: nn.Module, config: SchemeConfig,
                calibration: Calibration) -> nn.Module:
        raise NotImplementedError


_SCHEMES: dict[str, Scheme] = {}
_HANDLERS: dict[type[SchemeConfig], Scheme] = {}


def register_scheme(scheme: type[Scheme]) -> type[Scheme]:
    """Class decorator: add a numeric scheme, the handler of its config type (names and
    config types are unique)."""
    if scheme.name in _SCHEMES:
        raise ValueError(f"a scheme named {scheme.name!r} is registered")
    if not (isinstance(scheme.config, type) and issubclass(scheme.config, SchemeConfig)):
        raise ValueError(f"The 'config' of scheme {scheme.name!r} must be a SchemeConfig "
                         f"subclass. Got {scheme.config!r} instead.")
    if scheme.config in _HANDLERS:
        raise ValueError(f"{scheme.config.__name__} is handled by scheme "
                         f"{_HANDLERS[scheme.config].name!r}")
    _SCHEMES[scheme.name] = _HANDLERS[scheme.config] = scheme()
    return scheme


def scheme_names() -> tuple[str, ...]:
    """The registered schemes, in registration order."""
    return tuple(_SCHEMES)


def scheme(name: str) -> Scheme:
    if name not in _SCHEMES:
        raise ValueError(f"unknown quantization scheme {name!r}; expected one of "
                         f"{list(_SCHEMES)}")
    return _SCHEMES[name]


def convert(model: nn.Module, config: SchemeConfig, calibration: Calibration) -> nn.Module:
    """``model`` converted by the scheme registered for the type of ``config``."""
    if type(config) not in _HANDLERS:
        raise ValueError(f"no scheme handles {type(config).__name__}; registered: "
                         f"{[c.__name__ for c in _HANDLERS]}")
    return _HANDLERS[type(config)].convert(model, config, calibration)


def kept_layers(model: nn.Module, layers: LayerFilter) -> list[str]:
    """Names of the outermost submodules of ``model`` that ``layers`` rejects (what a
    scheme converting the whole model leaves in float), in module order."""
    kept: list[str] = []
    for fqn, module in model.named_modules():
        inside = any(fqn.startswith(name + ".") for name in kept)
        if fqn and not inside and not layers(module, fqn):
            kept.append(fqn)
    return kept


def quantize(model: nn.Module, scheme_name: str, example_input: Inputs,
             calibration: Iterable | None = None, *, granularity: str = "per_channel",
             keep_float: Iterable[str] = (), activations: str = "asymmetric") -> nn.Module:
    """Return ``model`` (eval mode) in the scheme named ``scheme_name``; the input model may
    be modified. ``calibration`` batches (or their inputs) feed calibrated schemes
    (default: ``example_input``); ``granularity`` of integer weights is ``per_channel``
    (per output channel / row) or ``per_tensor``; the layers named in ``keep_float``
    (module names of ``model``) stay in float; static int8 ``activations`` are uint8 with
    a zero point fitted to each tensor's range (``asymmetric``) or fixed at 127
    (``symmetric``)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {list(GRANULARITIES)}. "
                         f"Got {granularity!r} instead.")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {list(ACTIVATIONS)}. "
                         f"Got {activations!r} instead.")
    model.eval()
    inputs = ([batch_inputs(b) for b in calibration]
              if calibration is not None else [example_input])
    config_type = scheme(scheme_name).config
    options = {"granularity": granularity, "activations": activations}
    fields = {f.name: f for f in dataclasses.fields(config_type)}
    config = config_type(
        **{name: value for name, value in options.items() if name in fields},
        layers=Skipping(fields["layers"].default, frozenset(keep_float)))
    return convert(model, config, Calibration(example_input, inputs))
