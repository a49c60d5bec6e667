"""Recovery fine-tune by knowledge distillation from the original teacher."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._config import Config, param
from ._model_io import Inputs, call, predict
from ._structure import output_layers
from ._technique import Context, Technique, register, techniques
from ._training import Deadline, count_parameters, cycle, distillation_loss


class _Features:
    """The input of a model's output layer, captured on every forward."""

    def __init__(self, model: nn.Module, example: Inputs, role: str):
        layers = output_layers(model, example)
        if not layers:
            raise ValueError(f"feature distillation needs the {role} to end in a Linear / "
                             "Conv layer whose input it can match")
        self.value: torch.Tensor | None = None
        self.handle = layers[0].register_forward_pre_hook(self._capture)

    def _capture(self, _module, inputs):
        self.value = inputs[0].flatten(1)

    def take(self) -> torch.Tensor:
        value, self.value = self.value, None
        return value


def distill(student: nn.Module, teacher: nn.Module, train: Iterable, *, steps: int,
            config: DistillationConfig, learning_rate: float, seed: int,
            deadline: Deadline | None = None,
            on_step: Callable[[int, float], int | None] | None = None) -> nn.Module:
    """Train ``student`` for ``steps`` batches against the teacher, in place.

    The loss is ``distillation_loss`` on the logits plus, when ``config.feature_weight``
    is positive, that weight times the mean squared error between the teacher's
    penultimate features (the input of its output layer) and the student's, mapped by a
    learned linear projection that is discarded afterwards. AdamW with a cosine-decayed
    learning rate; deterministic for a given seed and data order. ``on_step(step, loss)``
    runs after each optimizer step; when it returns a larger step count, the fine-tune is
    extended to that many steps, the learning rate decaying from its current value to zero
    over the added steps (a promotion). Raises FloatingPointError when the loss becomes NaN
    or infinite, BudgetExceeded past the deadline. ``steps == 0`` leaves the student
    untouched.
    """
    if steps <= 0:
        return student
    torch.manual_seed(seed)
    teacher.eval()
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    batches = cycle(train)
    features = None
    if config.feature_weight > 0:
        first_inputs, _ = next(cycle(train))
        with torch.no_grad():
            student.eval()
            taps = (_Features(teacher, first_inputs, "teacher"),
                    _Features(student, first_inputs, "student"))
            call(teacher, first_inputs)
            call(student, first_inputs)
            student.train()
        t_dim, s_dim = taps[0].take().shape[1], taps[1].take().shape[1]
        projection = nn.Linear(s_dim, t_dim, bias=False)
        params += list(projection.parameters())
        features = (taps, projection)
    try:
        _train(student, teacher, batches, steps, config, learning_rate, params, features,
               deadline, on_step)
    finally:
        if features is not None:
            for tap in features[0]:
                tap.handle.remove()
    student.eval()
    return student


class _Cosine:
    """Cosine decay of the learning-rate factor to zero at ``steps``; ``extend`` restarts
    the decay from the current factor over a longer total."""

    def __init__(self, steps: int):
        self.start, self.factor, self.steps = 0, 1.0, steps

    def __call__(self, k: int) -> float:
        span = max(1, self.steps - self.start)
        return self.factor * 0.5 * (1 + math.cos(math.pi * (k - self.start) / span))

    def extend(self, k: int, steps: int) -> None:
        self.start, self.factor, self.steps = k, self(k), steps


def _train(student, teacher, batches, steps, config, learning_rate, params, features,
           deadline, on_step) -> None:
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    cosine = _Cosine(steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    step = 0
    while step < cosine.steps:
        inputs, targets = next(batches)
        with torch.no_grad():
            teacher_logits = predict(teacher, inputs)
        loss = distillation_loss(predict(student, inputs), teacher_logits, targets, config)
        if features is not None:
            (t_tap, s_tap), projection = features
            loss = loss + config.feature_weight * F.mse_loss(projection(s_tap.take()),
                                                             t_tap.take())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"distillation loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        extended = None if on_step is None else on_step(step - 1, loss.item())
        if extended is not None and extended > cosine.steps:
            cosine.extend(step, extended)
        if deadline is not None:
            deadline.check(f"fine-tune step {step}/{cosine.steps}")


@dataclass(frozen=True)
class DistillationConfig(Config):
    """Recovery fine-tune loss: alpha * T^2 * KL(soft targets at T) + (1 - alpha) * CE,
    plus ``feature_weight`` * MSE between the teacher's penultimate features and the
    student's through a learned linear projection (0: response distillation only)."""

    temperature: float = param(4.0, low=0.0, high=100.0, low_open=True)
    alpha: float = param(0.9, low=0.0, high=1.0)
    feature_weight: float = param(0.0, low=0.0, high=100.0, off=True,
                                  note="penultimate-feature matching")


@register
class FineTune(Technique):
    """``finetune_steps`` of distillation from the teacher when anything changed the model
    (or QAT must learn its ranges); the step hooks run after each optimizer step."""

    section, config, order, stage = "distillation", DistillationConfig, 60, "fine-tune"

    def apply(self, model: nn.Module, config: DistillationConfig, ctx: Context) -> nn.Module:
        steps = ctx.finetune_steps if ctx.changed or ctx.needs_training else 0
        settled = max(t.settled(getattr(ctx.recipe, t.section)) for t in techniques())
        rungs = sorted({max(1, round(f * steps)) for f in ctx.rungs if settled <= f < 1})
        if steps and ctx.on_rung is not None:
            ctx.on_rung(0, steps, model.eval())
        total = steps
        if steps:
            def on_step(step: int, _loss: float) -> int | None:
                nonlocal total
                for hook in ctx.step_hooks:
                    hook(model, step)
                if ctx.on_rung is None or step + 1 not in rungs or total != steps:
                    return None
                extended = ctx.on_rung(step + 1, steps, model.eval())
                model.train()
                if extended is not None and extended > total:
                    total = extended
                    ctx.facts["promoted_at_step"] = step + 1
                return total

            distill(model, ctx.teacher, ctx.train, steps=steps, config=config,
                    learning_rate=ctx.learning_rate, seed=ctx.seed, deadline=ctx.deadline,
                    on_step=on_step)
        model.eval()
        ctx.facts["finetune_steps"] = total
        ctx.facts["parameters"] = count_parameters(model)
        return model

    def label(self, config: DistillationConfig) -> str:
        return f"feat={config.feature_weight:g}" if config.feature_weight else ""
