"""Numeric schemes of the deployed model: each registered with how a model is converted."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, Literal, get_args

from torch import nn

from ._model_io import Inputs, batch_inputs

Granularity = Literal["per_channel", "per_tensor"]
Activations = Literal["asymmetric", "symmetric"]
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
ACTIVATIONS: tuple[str, ...] = get_args(Activations)


class Scheme:
    """One value of ``quantization.scheme``; a subclass is registered with ``register_scheme``.

    ``integer_weights``: the scheme stores its own integer weights (``granularity``
    applies; k-means sharing does not); ``calibrated``: it reads calibration batches;
    ``qat``: it can be trained with fake quantization; ``levels``: the weight levels a
    cheap sensitivity proxy rounds to (0: bf16 rounding; None: none, nothing is rounded);
    ``tolerance``: the largest relative output difference accepted between the lowered
    and the eager model. ``convert(model, example_input, calibration, granularity, keep,
    activations)`` returns the model in this scheme (the input may be modified); ``keep``
    names layers left in float; ``calibration`` is a list of input batches;
    ``activations`` (``asymmetric`` or ``symmetric``) is for schemes that quantize them.
    """

    name: ClassVar[str]
    integer_weights: ClassVar[bool] = False
    calibrated: ClassVar[bool] = False
    qat: ClassVar[bool] = False
    levels: ClassVar[int | None] = None
    tolerance: ClassVar[float] = 1e-3

    def convert(self, model: nn.Module, example_input: Inputs,
                calibration: list[Inputs], granularity: str,
                keep: frozenset[str], activations: str) -> nn.Module:
        raise NotImplementedError


_SCHEMES: dict[str, Scheme] = {}


def register_scheme(scheme: type[Scheme]) -> type[Scheme]:
    """Class decorator: add a numeric scheme (names are unique)."""
    if scheme.name in _SCHEMES:
        raise ValueError(f"a scheme named {scheme.name!r} is registered")
    _SCHEMES[scheme.name] = scheme()
    return scheme


def scheme_names() -> tuple[str, ...]:
    """The registered schemes, in registration order."""
    return tuple(_SCHEMES)


def scheme(name: str) -> Scheme:
    if name not in _SCHEMES:
        raise ValueError(f"unknown quantization scheme {name!r}; expected one of "
                         f"{list(_SCHEMES)}")
    return _SCHEMES[name]


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
    return scheme(scheme_name).convert(model, example_input, inputs, granularity,
                                       frozenset(keep_float), activations)
