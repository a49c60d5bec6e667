"""Recovery fine-tune by knowledge distillation from the original teacher."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ._recipe import DistillationConfig
from ._structure import output_layers


class BudgetExceeded(RuntimeError):
    """A trial ran past its time budget."""


class Deadline:
    """A wall-clock budget; ``check`` raises BudgetExceeded once it has passed."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.monotonic()

    def check(self, stage: str) -> None:
        if self.seconds is not None and time.monotonic() - self.start > self.seconds:
            raise BudgetExceeded(
                f"time budget of {self.seconds:g} s exceeded during {stage}"
            )


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      targets: torch.Tensor | None, config: DistillationConfig) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * cross-entropy."""
    t = config.temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=-1),
                    F.log_softmax(teacher_logits / t, dim=-1),
                    reduction="batchmean", log_target=True) * (t * t)
    if targets is None or config.alpha == 1.0:
        return soft
    hard = F.cross_entropy(student_logits, targets)
    return config.alpha * soft + (1.0 - config.alpha) * hard


def _cycle(batches: Iterable) -> Iterator:
    """Endless batches; collections with ``set_epoch`` restart at epoch 0 so a fine-tune
    sees the same data order whatever ran before it (DataLoaders follow the seeded RNG)."""
    epoch = 0
    while True:
        empty = True
        if hasattr(batches, "set_epoch"):
            batches.set_epoch(epoch)
        epoch += 1
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("the training data yielded no batches")


class _Features:
    """The input of a model's output layer, captured on every forward."""

    def __init__(self, model: nn.Module, example: torch.Tensor, role: str):
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
            on_step: Callable[[int, float], None] | None = None) -> nn.Module:
    """Train ``student`` for ``steps`` batches against the teacher, in place.

    The loss is ``distillation_loss`` on the logits plus, when ``config.feature_weight``
    is positive, that weight times the mean squared error between the teacher's
    penultimate features (the input of its output layer) and the student's, mapped by a
    learned linear projection that is discarded afterwards. AdamW with a cosine-decayed
    learning rate; deterministic for a given seed and data order. ``on_step(step, loss)``
    runs after each optimizer step. Raises FloatingPointError when the loss becomes NaN
    or infinite, BudgetExceeded past the deadline. ``steps == 0`` leaves the student
    untouched.
    """
    if steps <= 0:
        return student
    torch.manual_seed(seed)
    teacher.eval()
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    batches = _cycle(train)
    features = None
    if config.feature_weight > 0:
        first_inputs, _ = next(_cycle(train))
        with torch.no_grad():
            student.eval()
            taps = (_Features(teacher, first_inputs, "teacher"),
                    _Features(student, first_inputs, "student"))
            teacher(first_inputs)
            student(first_inputs)
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


def _train(student, teacher, batches, steps, config, learning_rate, params, features,
           deadline, on_step) -> None:
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    for step in range(steps):
        inputs, targets = next(batches)
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        loss = distillation_loss(student(inputs), teacher_logits, targets, config)
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
        if on_step is not None:
            on_step(step, loss.item())
        if deadline is not None:
            deadline.check(f"fine-tune step {step + 1}/{steps}")
