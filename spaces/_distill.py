"""Recovery fine-tune by knowledge distillation from the original teacher."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ._config import Config, param
from ._model_io import Inputs, call, predict
from ._structure import evenly_spaced, output_layers, repeated_blocks
from ._technique import Context, Phase, Technique, register, techniques
from ._training import Deadline, count_parameters, cycle, distillation_loss


class _Tap:
    """A module's input (``output=False``) or output, captured on every forward."""

    def __init__(self, module: nn.Module, output: bool):
        self.value: torch.Tensor | None = None
        self.handle = (module.register_forward_hook(self._output) if output
                       else module.register_forward_pre_hook(self._input))

    def _input(self, _module, inputs):
        self.value = inputs[0].flatten(1)

    def _output(self, _module, _inputs, output):
        self.value = output[0] if isinstance(output, tuple | list) else output

    def take(self) -> torch.Tensor:
        value, self.value = self.value, None
        return value


def _penultimate(model: nn.Module, example: Inputs, role: str) -> _Tap:
    """A tap on the input of the model's output layer."""
    layers = output_layers(model, example)
    if not layers:
        raise ValueError(f"feature distillation needs the {role} to end in a Linear / "
                         "Conv layer whose input it can match")
    return _Tap(layers[0], output=False)


def _block_pairs(teacher: nn.Module, student: nn.Module, example: Inputs
                 ) -> list[tuple[nn.Module, nn.Module]]:
    """(teacher block, student block) pairs for hidden-state matching: in each container
    of the teacher's repeated blocks, the student's children of the same class there (a
    depth student may keep a single one); student block ``j`` of ``S`` is matched with
    teacher block ``linspace(0, T - 1, S)[j]``, the one ``drop_blocks`` keeps in its place."""
    pairs = []
    for name, indices in sorted(repeated_blocks(teacher, example).items()):
        t_blocks = [teacher.get_submodule(name)[i] for i in indices]
        try:
            container = student.get_submodule(name)
        except AttributeError:
            continue
        s_blocks = [c for c in container.children() if type(c) is type(t_blocks[0])]
        if not 0 < len(s_blocks) <= len(t_blocks):
            continue
        positions = evenly_spaced(len(t_blocks), len(s_blocks))
        pairs += [(t_blocks[p], s) for p, s in zip(positions, s_blocks, strict=True)]
    if not pairs:
        raise ValueError("hidden-state distillation needs repeated blocks (e.g. encoder "
                         "layers) that the teacher and the student share by name")
    return pairs


class _Projection(nn.Module):
    """Maps the student's features to the teacher's width along the channel axis (the last
    one, or the second of image-like 4-D tensors); the identity when the widths agree."""

    def __init__(self, student: torch.Tensor, teacher: torch.Tensor):
        super().__init__()
        self.axis = 1 if teacher.dim() == 4 else -1
        s_dim, t_dim = student.shape[self.axis], teacher.shape[self.axis]
        self.linear = None if s_dim == t_dim else nn.Linear(s_dim, t_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear is None:
            return x
        return self.linear(x.movedim(self.axis, -1)).movedim(-1, self.axis)


class _Matching:
    """Teacher and student taps with a projection each, and their mean squared error."""

    def __init__(self, teacher: nn.Module, student: nn.Module, first_inputs: Inputs,
                 taps: list[tuple[_Tap, _Tap]]):
        self.taps = taps
        with torch.no_grad():
            was_training = student.training
            student.eval()
            call(teacher, first_inputs)
            call(student, first_inputs)
            student.train(was_training)
        self.projections = nn.ModuleList(_Projection(s.take(), t.take()) for t, s in taps)

    def loss(self) -> torch.Tensor:
        errors = [F.mse_loss(p(s.take()), t.take())
                  for (t, s), p in zip(self.taps, self.projections, strict=True)]
        return sum(errors) / len(errors)

    def remove(self) -> None:
        for pair in self.taps:
            for tap in pair:
                tap.handle.remove()


def distill(student: nn.Module, teacher: nn.Module, train: Iterable, *, steps: int,
            config: DistillationConfig, learning_rate: float, seed: int,
            deadline: Deadline | None = None,
            on_step: Callable[[int, float], int | None] | None = None) -> nn.Module:
    """Train ``student`` for ``steps`` batches against the teacher, in place.

    The loss is ``distillation_loss`` on the logits plus, when ``config.feature_weight``
    is positive, that weight times the mean squared error between the teacher's
    penultimate features (the input of its output layer) and the student's, and when
    ``config.hidden_weight`` is positive, that weight times the mean over matched repeated
    blocks (``_block_pairs``, e.g. encoder layers) of the error between their outputs
    (TinyBERT's hidden-state loss); features of another width pass through a learned
    linear projection that is discarded afterwards. AdamW with a cosine-decayed
    learning rate; deterministic for a given seed and data order. ``on_step(step, loss)``
    runs after each optimizer step and may return the fine-tune's new length: a larger
    step count extends it (a promotion: the learning rate decays from its current value to
    zero over the added steps), one not past the steps done ends it there. Raises
    FloatingPointError when the loss becomes NaN or infinite, BudgetExceeded past the
    deadline. ``steps == 0`` leaves the student untouched.
    """
    if steps <= 0:
        return student
    torch.manual_seed(seed)
    teacher.eval()
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    batches = cycle(train)
    matchings: list[tuple[float, _Matching]] = []
    if config.feature_weight > 0 or config.hidden_weight > 0:
        first_inputs, _ = next(cycle(train))
    try:
        if config.feature_weight > 0:
            taps = [(_penultimate(teacher, first_inputs, "teacher"),
                     _penultimate(student, first_inputs, "student"))]
            matchings.append((config.feature_weight,
                              _Matching(teacher, student, first_inputs, taps)))
        if config.hidden_weight > 0:
            taps = [(_Tap(t, output=True), _Tap(s, output=True))
                    for t, s in _block_pairs(teacher, student, first_inputs)]
            matchings.append((config.hidden_weight,
                              _Matching(teacher, student, first_inputs, taps)))
        for _, matching in matchings:
            params += list(matching.projections.parameters())
        _train(student, teacher, batches, steps, config, learning_rate, params, matchings,
               deadline, on_step)
    finally:
        for _, matching in matchings:
            matching.remove()
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


def _train(student, teacher, batches, steps, config, learning_rate, params, matchings,
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
        for weight, matching in matchings:
            loss = loss + weight * matching.loss()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"distillation loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        extended = None if on_step is None else on_step(step - 1, loss.item())
        if extended is not None and extended <= step:
            break  # stopped
        if extended is not None and extended > cosine.steps:
            cosine.extend(step, extended)
        if deadline is not None:
            deadline.check(f"fine-tune step {step}/{cosine.steps}")


@dataclass(frozen=True)
class DistillationConfig(Config):
    """Recovery fine-tune loss: alpha * T^2 * KL(soft targets at T) + (1 - alpha) * CE,
    plus ``feature_weight`` * MSE between the teacher's penultimate features and the
    student's, plus ``hidden_weight`` * MSE between the outputs of matched repeated blocks
    (encoder layers), each through a learned linear projection when widths differ
    (0: response distillation only)."""

    temperature: float = param(4.0, low=0.0, high=100.0, low_open=True)
    alpha: float = param(0.9, low=0.0, high=1.0)
    feature_weight: float = param(0.0, low=0.0, high=100.0, off=True,
                                  note="penultimate-feature matching")
    hidden_weight: float = param(0.0, low=0.0, high=100.0, off=True,
                                 note="hidden-state matching of repeated blocks")


@register
class Distillation(Technique):
    """``finetune_steps`` of distillation from the teacher when anything changed the model
    (or QAT must learn its ranges); after each optimizer step the context's watch is told
    (see FineTuneWatch), then the step hooks run."""

    section, config, stage = "distillation", DistillationConfig, "fine-tune"
    phase = Phase.FINE_TUNE

    def apply(self, model: nn.Module, config: DistillationConfig, ctx: Context) -> nn.Module:
        steps = ctx.finetune_steps if ctx.changed or ctx.needs_training else 0
        ctx.facts["finetune_steps"] = steps
        if steps and not self._rung(ctx, 0, steps, model):
            return model
        if steps:
            distill(model, ctx.teacher, ctx.train, steps=steps, config=config,
                    learning_rate=ctx.learning_rate, seed=ctx.seed, deadline=ctx.deadline,
                    on_step=partial(self._after_step, ctx, model, self._rungs(ctx, steps)))
        model.eval()
        ctx.facts["parameters"] = count_parameters(model)
        return model

    @staticmethod
    def _rungs(ctx: Context, steps: int) -> set[int]:
        """The steps the watch sees, past the point where every technique has settled."""
        if ctx.watch is None:
            return set()
        settled = max(t.settled(getattr(ctx.recipe, t.section)) for t in techniques())
        return {max(1, round(f * steps)) for f in ctx.watch.rungs if settled <= f < 1}

    def _after_step(self, ctx: Context, model: nn.Module, rungs: set[int], step: int,
                    _loss: float) -> int | None:
        """The fine-tune's new length when a rung changes it: longer once promoted,
        ``step + 1`` once stopped; else None."""
        planned = ctx.finetune_steps
        total = ctx.facts["finetune_steps"]
        if ctx.watch is not None:
            ctx.watch.after_step(step + 1, total)
        for hook in ctx.step_hooks:
            hook(model, step)
        if step + 1 not in rungs or total != planned:
            return None
        if not self._rung(ctx, step + 1, planned, model):
            return step + 1
        model.train()
        extended = ctx.facts["finetune_steps"]
        return extended if extended != planned else None

    @staticmethod
    def _rung(ctx: Context, step: int, steps: int, model: nn.Module) -> bool:
        """Show the watch the model at ``step``; False when it stops the fine-tune there."""
        if ctx.watch is None:
            return True
        verdict = ctx.watch.at_rung(step, steps, model.eval())
        if verdict.stop is not None:
            ctx.stopped = verdict.stop
            ctx.facts["stopped_at_step"] = step
            return False
        if step > 0 and verdict.extend_to is not None and verdict.extend_to > steps:
            ctx.facts["finetune_steps"] = verdict.extend_to
            ctx.facts["promoted_at_step"] = step
        return True

    def label(self, config: DistillationConfig) -> str:
        return " ".join([f"feat={config.feature_weight:g}"] * bool(config.feature_weight)
                        + [f"hidden={config.hidden_weight:g}"] * bool(config.hidden_weight))
