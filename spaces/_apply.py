"""Applying a whole Recipe to a teacher: a walk over the registered techniques."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import nn

from ._layers import canonicalize
from ._model_io import Inputs
from ._recipe import Recipe
from ._technique import Context, Phase, Technique, techniques
from ._training import Deadline, FineTuneWatch

_STRUCTURAL = (Phase.STUDENT, Phase.PRUNING)


def compress(teacher: nn.Module, recipe: Recipe, *, example_input: Inputs,
             train: Iterable, calibration: Iterable | None, finetune_steps: int,
             learning_rate: float, seed: int,
             student_factory: Callable[[float, float], nn.Module] | None = None,
             deadline: Deadline | None = None,
             on_stage: Callable[[str], None] | None = None,
             watch: FineTuneWatch | None = None,
             structure: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Apply ``recipe`` to a copy of ``teacher``; return the compressed model and facts about it.

    Each registered technique's ``apply`` runs in the techniques' order with its section
    of the recipe, and the steps they schedule run at their place (see ``Technique``).
    The distillation fine-tune is skipped when nothing changed the model. The teacher is
    not modified. The same recipe, seed and data give the same model. A combination that
    cannot be applied raises ValueError saying why; past the ``deadline``, BudgetExceeded.
    Registered weight layers (transformers' ``Conv1D``) become their canonical kind first
    (``canonicalize``). The facts are numbers, strings and booleans. ``watch`` follows the
    fine-tune (see FineTuneWatch); when it stops it, the facts hold its reason as
    ``stopped`` and the step it stopped at as ``stopped_at_step``, and the model is the
    partly trained one.
    ``structure``, when given, is the result of the student and pruning phases (e.g. a
    slice of an elastic student): a copy of it starts the pipeline instead of the teacher.
    """
    torch.manual_seed(seed)
    teacher.eval()
    ctx = Context(recipe=recipe, teacher=teacher, example_input=example_input, train=train,
                  calibration=calibration, finetune_steps=finetune_steps,
                  learning_rate=learning_rate, seed=seed, student_factory=student_factory,
                  deadline=deadline or Deadline(None), on_stage=on_stage or (lambda _n: None),
                  watch=watch)
    for t in techniques():
        if structure is None or t.phase not in _STRUCTURAL:
            ctx.later(t.phase, t.stage, partial(_apply, t, getattr(recipe, t.section)))
    ctx.changed = structure is not None
    model = ctx.run(canonicalize(copy.deepcopy(teacher if structure is None else structure)))
    if ctx.stopped is not None:
        ctx.facts["stopped"] = ctx.stopped
    return model, ctx.facts


def _apply(technique: Technique, config, model: nn.Module, ctx: Context) -> nn.Module:
    return technique.apply(model, config, ctx)
