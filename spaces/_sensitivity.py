"""Which layers stay in float: the first and the last, or the ones whose rounded weights
change the model's outputs the most."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._model_io import Inputs, predict, relative_error
from ._schemes import scheme
from ._structure import run_with_hooks

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def output_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The relative error of a compressed model's outputs, to 6 decimals; FloatingPointError
    when it is not finite."""
    error = relative_error(actual, expected)
    if not math.isfinite(error):
        raise FloatingPointError(f"the quantized model's outputs are not finite ({error})")
    return round(error, 6)


def float_layers(model: nn.Module, example_input: Inputs, rule: str,
                 inputs: list[Inputs], scheme_name: str, cluster_bits: int) -> list[str]:
    """Names of the Linear / Conv layers kept at float precision under ``rule``.

    ``first_last``: the first and the last layer called. ``sensitive``: the quarter of the
    layers (at least one) whose weights alone, rounded to the target precision (the
    scheme's integer levels per channel, bf16, or ``cluster_bits`` uniform levels), change
    the model's outputs on ``inputs`` the most. ``none``: no layer.
    """
    if rule == "none":
        return []
    order: list[nn.Module] = []
    run_with_hooks(model, [m for m in model.modules() if isinstance(m, _LAYERS)],
                   lambda mod, _i, _o: order.append(mod), example_input)
    names = {m: n for n, m in model.named_modules()}
    called = list(dict.fromkeys(order))
    if rule == "first_last":
        return sorted({names[called[0]], names[called[-1]]}) if called else []
    if rule != "sensitive":
        raise ValueError(f"keep_float must be 'none', 'first_last' or 'sensitive'. "
                         f"Got {rule!r} instead.")
    levels = 2 ** cluster_bits if cluster_bits else scheme(scheme_name).levels
    with torch.no_grad():
        reference = [predict(model, x).float() for x in inputs]
        scores = []
        for layer in called:
            original = layer.weight.detach().clone()
            layer.weight.copy_(_rounded(original, levels))
            error = sum(output_error(predict(model, x).float(), ref)
                        for x, ref in zip(inputs, reference, strict=True))
            layer.weight.copy_(original)
            scores.append(error)
    count = max(1, math.ceil(len(called) / 4))
    ranked = sorted(range(len(called)), key=lambda i: -scores[i])[:count]
    return sorted(names[called[i]] for i in ranked)


def _rounded(weight: torch.Tensor, levels: int | None) -> torch.Tensor:
    """``weight`` rounded as the target precision would (a cheap sensitivity proxy):
    ``levels`` uniform levels per output channel, bf16 for 0, unchanged for None."""
    if levels is None:
        return weight
    if levels == 0:
        return weight.to(torch.bfloat16).float()
    rows = weight.reshape(weight.shape[0], -1)
    scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / (levels / 2 - 0.5)
    return (torch.round(rows / scale) * scale).reshape(weight.shape)
