"""Structural changes: student slimming and structured pruning, following the dependency graph."""

from __future__ import annotations

import warnings

import torch
import torch_pruning as tp
from torch import nn

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def output_layers(model: nn.Module, example_input: torch.Tensor) -> list[nn.Module]:
    """The Linear/Conv layers whose outputs are the model's outputs (never pruned).

    Falls back to the last Linear/Conv called when the output is produced by another op.
    """
    called: list[tuple[nn.Module, torch.Tensor]] = []

    def hook(module, _inputs, output):
        called.append((module, output))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, _PRUNABLE)]
    try:
        with torch.no_grad():
            out = model(example_input)
    finally:
        for h in handles:
            h.remove()
    direct = [m for m, o in called if o is out]
    if direct:
        return direct
    return [called[-1][0]] if called else []


def prune_channels(model: nn.Module, example_input: torch.Tensor, ratio: float, *,
                   global_ranking: bool, round_to: int | None = None) -> nn.Module:
    """Physically remove ``ratio`` of the channels / neurons of every prunable group, in place.

    Channels are ranked by the L2 norm of their weights, across the whole network when
    ``global_ranking`` (layers shrink unevenly), or within each layer otherwise (uniform
    slimming). Consumers of a removed channel shrink to match (Torch-Pruning's dependency
    graph: residual adds, concatenations, normalization layers). The output layer keeps
    its width. ``ratio == 0`` returns the model untouched.
    """
    if ratio == 0:
        return model
    was_training = model.training
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.BasePruner(
            model,
            example_input,
            importance=tp.importance.MagnitudeImportance(p=2),
            global_pruning=global_ranking,
            pruning_ratio=ratio,
            max_pruning_ratio=0.95,
            ignored_layers=output_layers(model, example_input),
            round_to=round_to,
        )
        pruner.step()
    model.train(was_training)
    return model


def derive_student(teacher: nn.Module, example_input: torch.Tensor, width: float) -> nn.Module:
    """A copy of the teacher slimmed uniformly to ``width`` of its channels, weights inherited."""
    import copy

    student = copy.deepcopy(teacher)
    return prune_channels(student, example_input, 1.0 - width, global_ranking=False)
