"""What fine-tuning shares: the distillation loss, endless batches, the time budget and the
watch that follows a fine-tune from outside (``FineTuneWatch``, answering with a ``Verdict``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ._model_io import split_batch

Loss = Callable[[nn.Module], torch.Tensor]
"""A scalar loss of a model on fixed data (for gradients and sensitivity measurements)."""


class BudgetExceeded(RuntimeError):
    """A trial ran past its time budget."""


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class Verdict:
    """What a fine-tune watch says at a rung: go on (both None), extend the fine-tune to
    ``extend_to`` steps (a promotion), or ``stop`` there for that reason."""

    extend_to: int | None = None
    stop: str | None = None


class FineTuneWatch(Protocol):
    """What follows a fine-tune from outside it, knowing nothing of how it is used.

    ``rungs`` are fractions of the fine-tune; ``at_rung(step, steps, model)`` sees the model
    (in eval mode) before the first step (step 0: its verdict can stop, not extend) and
    after each rung's step, and returns a Verdict; ``after_step(done, total)`` runs after
    every optimizer step. Once extended, the fine-tune shows no further rung."""

    rungs: tuple[float, ...]

    def at_rung(self, step: int, steps: int, model: nn.Module) -> Verdict: ...

    def after_step(self, done: int, total: int) -> None: ...


class Deadline:
    """A wall-clock limit set by ``setting`` (named in the message); ``check`` raises
    BudgetExceeded once it has passed."""

    def __init__(self, seconds: float | None, setting: str = "the time limit"):
        self.seconds, self.setting = seconds, setting
        self.start = time.monotonic()

    def check(self, stage: str) -> None:
        if self.seconds is not None and time.monotonic() - self.start > self.seconds:
            raise BudgetExceeded(
                f"the trial ran past {self.setting} = {self.seconds:g} s during {stage}"
            )


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      targets: torch.Tensor | None, config: Any) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * cross-entropy."""
    t = config.temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=-1),
                    F.log_softmax(teacher_logits / t, dim=-1),
                    reduction="batchmean", log_target=True) * (t * t)
    if targets is None or config.alpha == 1.0:
        return soft
    hard = F.cross_entropy(student_logits, targets)
    return config.alpha * soft + (1.0 - config.alpha) * hard


def cycle(batches: Iterable) -> Iterator:
    """Endless ``(inputs, targets)`` pairs of ``batches`` (any task batch form); collections
    with ``set_epoch`` restart at epoch 0 so a fine-tune sees the same data order whatever
    ran before it (DataLoaders follow the seeded RNG)."""
    epoch = 0
    while True:
        empty = True
        if hasattr(batches, "set_epoch"):
            batches.set_epoch(epoch)
        epoch += 1
        for batch in batches:
            empty = False
            yield split_batch(batch)
        if empty:
            raise ValueError("the training data yielded no batches")
