"""How a pruning ratio spreads over the layers: per-layer ratios tilted along the network
or scaled inversely to each layer's measured sensitivity."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ._model_io import Inputs
from ._structure import group_roots, prune_channels
from ._training import Loss


def tapered_ratios(roots: list[str], ratio: float, taper: float) -> dict[str, float]:
    """Per-group pruning ratios that average ``ratio`` and tilt along the network:
    ``ratio * (1 + taper * (2 t - 1))`` at relative position ``t`` (0 for the first group,
    1 for the last), clipped to [0, 0.9]. A positive ``taper`` prunes the late layers more
    (in a CNN: the fewer, wider layers that hold most weights), a negative one the early
    layers (most of the compute)."""
    last = len(roots) - 1
    return {name: min(max(ratio * (1 + taper * (2 * i / last - 1 if last else 0)), 0.0), 0.9)
            for i, name in enumerate(roots)}


def sensitivity_ratios(model: nn.Module, example_input: Inputs, ratio: float,
                       loss: Loss) -> dict[str, float]:
    """Per-layer pruning ratios scaled inversely to each group's measured sensitivity.

    Each prunable group (named by the layer leading it) is pruned alone by ``ratio``
    (L2 ranking) on a copy of the model; its sensitivity is the increase of ``loss``. The
    ratios are ``ratio * w / mean(w)`` with ``w = 1 / (sensitivity + median sensitivity)``,
    clipped to [0, 0.9]: robust layers lose more channels, fragile ones fewer.
    """
    with torch.no_grad():
        base = float(loss(model))
    roots = group_roots(model, example_input)
    if not roots:
        return {}
    sensitivity = []
    for root in roots:
        trial = copy.deepcopy(model)
        prune_channels(trial, example_input, 0.0, global_ranking=False,
                       layer_ratios={trial.get_submodule(root): ratio})
        with torch.no_grad():
            sensitivity.append(max(float(loss(trial)) - base, 0.0))
    s = torch.tensor(sensitivity)
    weights = 1.0 / (s + s.median() + 1e-8)
    ratios = (ratio * weights / weights.mean()).clamp(0.0, 0.9)
    return dict(zip(roots, ratios.tolist(), strict=True))
