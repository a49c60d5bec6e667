"""Applying a whole Recipe to a teacher: a walk over the registered techniques."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import nn

from ._model_io import Inputs
from ._recipe import Recipe
from ._technique import Context, Technique, techniques
from ._training import Deadline


def compress(teacher: nn.Module, recipe: Recipe, *, example_input: Inputs,
             train: Iterable, calibration: Iterable | None, finetune_steps: int,
             learning_rate: float, seed: int,
             student_factory: Callable[[float, float], nn.Module] | None = None,
             deadline: Deadline | None = None,
             on_stage: Callable[[str], None] | None = None, rungs: tuple[float, ...] = (),
             on_rung: Callable[[int, int, nn.Module], int | None] | None = None,
             between_steps: Callable[[], None] | None = None) -> tuple[nn.Module, dict]:
    """Apply ``recipe`` to a copy of ``teacher``; return the compressed model and facts about it.

    Each registered technique's ``apply`` runs in the techniques' order with its section
    of the recipe, and the steps they schedule run at their place (see ``Technique``).
    The distillation fine-tune is skipped when nothing changed the model. The teacher is
    not modified. The same recipe, seed and data give the same model. A combination that
    cannot be applied raises ValueError saying why; past the ``deadline``, BudgetExceeded.
    The facts are numbers, strings and booleans. ``on_rung`` sees the model at step 0 and
    at the ``rungs`` (fractions) of the fine-tune and may raise ``Stopped``, or return a
    larger step count to extend the fine-tune to (see ``Context``). ``between_steps()``
    runs after each fine-tune step (e.g. to pause while the machine times a model).
    """
    torch.manual_seed(seed)
    teacher.eval()
    ctx = Context(recipe=recipe, teacher=teacher, example_input=example_input, train=train,
                  calibration=calibration, finetune_steps=finetune_steps,
                  learning_rate=learning_rate, seed=seed, student_factory=student_factory,
                  deadline=deadline or Deadline(None), on_stage=on_stage or (lambda _n: None),
                  rungs=rungs, on_rung=on_rung)
    if between_steps is not None:
        ctx.step_hooks.append(lambda _model, _step: between_steps())
    for t in techniques():
        ctx.later(t.order, t.stage, partial(_apply, t, getattr(recipe, t.section)))
    model = ctx.run(copy.deepcopy(teacher))
    return model, ctx.facts


def _apply(technique: Technique, config, model: nn.Module, ctx: Context) -> nn.Module:
    return technique.apply(model, config, ctx)
