"""Recovery fine-tune by knowledge distillation from the original teacher."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ._recipe import DistillationConfig


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


def distill(student: nn.Module, teacher: nn.Module, train: Iterable, *, steps: int,
            config: DistillationConfig, learning_rate: float, seed: int,
            deadline: Deadline | None = None,
            on_step: Callable[[int, float], None] | None = None) -> nn.Module:
    """Train ``student`` for ``steps`` batches against the teacher's soft targets, in place.

    AdamW with a cosine-decayed learning rate; deterministic for a given seed and data
    order. Raises FloatingPointError when the loss becomes NaN or infinite, BudgetExceeded
    past the deadline. ``steps == 0`` leaves the student untouched.
    """
    if steps <= 0:
        return student
    torch.manual_seed(seed)
    teacher.eval()
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    batches = _cycle(train)
    for step in range(steps):
        inputs, targets = next(batches)
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        loss = distillation_loss(student(inputs), teacher_logits, targets, config)
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
    student.eval()
    return student
