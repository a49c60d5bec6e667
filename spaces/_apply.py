"""Applying a whole Recipe to a teacher, in the one documented order."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ._distill import Deadline, distill
from ._lowrank import factorize
from ._quantize import quantize
from ._recipe import Recipe
from ._structure import derive_student, prune_channels


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compress(teacher: nn.Module, recipe: Recipe, *, example_input: torch.Tensor,
             train: Iterable, calibration: Iterable | None, finetune_steps: int,
             learning_rate: float, seed: int,
             student_factory: Callable[[float, float], nn.Module] | None = None,
             deadline: Deadline | None = None,
             on_stage: Callable[[str], None] | None = None) -> tuple[nn.Module, dict]:
    """Apply ``recipe`` to a copy of ``teacher``; return the compressed model and facts about it.

    Order: student (task factory if given, else the teacher slimmed to the width) ->
    structured pruning -> low-rank factorization -> distillation fine-tune from the
    teacher (skipped when the structure is unchanged) -> quantization. The teacher is not
    modified. The same recipe, seed and data give the same model.
    """
    stage = on_stage or (lambda _name: None)
    deadline = deadline or Deadline(None)
    torch.manual_seed(seed)
    teacher.eval()

    stage("student")
    if student_factory is not None:
        model = student_factory(recipe.student.width, 1.0)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"the task's student factory returned {type(model).__name__}, expected "
                "an nn.Module"
            )
    elif recipe.student.width < 1.0:
        model = derive_student(teacher, example_input, recipe.student.width)
    else:
        model = copy.deepcopy(teacher)
    model.eval()
    changed = student_factory is not None or recipe.student.width < 1.0
    deadline.check("student")

    stage("prune")
    prune_channels(model, example_input, recipe.pruning.ratio, global_ranking=True)
    changed |= recipe.pruning.ratio > 0
    deadline.check("pruning")

    stage("low-rank")
    model, factorized = factorize(model, recipe.low_rank.rank_fraction)
    changed |= factorized > 0
    deadline.check("low-rank factorization")

    steps = finetune_steps if changed else 0
    if steps:
        stage("fine-tune")
        distill(model, teacher, train, steps=steps, config=recipe.distillation,
                learning_rate=learning_rate, seed=seed, deadline=deadline)
    model.eval()
    params = count_parameters(model)

    stage("quantize")
    compressed = quantize(model, recipe.quantization.scheme, example_input, calibration)
    deadline.check("quantization")
    return compressed, {
        "parameters": params,
        "factorized_layers": factorized,
        "finetune_steps": steps,
    }
