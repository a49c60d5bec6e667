"""The technique protocol and its registry: a recipe section, its stage, how it is applied."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from itertools import islice
from typing import Any, ClassVar

import torch
from torch import nn

from ._model_io import Inputs, batch_inputs, predict
from ._training import Deadline, FineTuneWatch, cycle, distillation_loss

LOSS_BATCHES = 4  # training batches behind Taylor gradients and sensitivity measurements

Step = Callable[[nn.Module, "Context"], nn.Module]


class Phase(IntEnum):
    """The places of the pipeline, in the order they run: a technique's ``apply`` runs at
    its phase, a step scheduled with ``Context.later`` at the phase it names."""

    STUDENT = 1  # a smaller student replaces the teacher
    PRUNING = 2  # channels removed
    LOW_RANK = 3  # layers factorized
    SPARSITY = 4  # masks set
    QUANTIZATION_SETUP = 5  # fake quantization inserted (QAT)
    FINE_TUNE = 6  # distillation from the teacher
    FINAL_MASKS = 7  # the sparsity masks made final
    FLOAT_LAYERS = 8  # the layers kept in float chosen
    WEIGHT_SHARING = 9  # k-means codebooks
    EMBEDDING = 10  # embedding tables stored compactly
    QUANTIZE = 11  # conversion to the numeric scheme
    SPARSE_STORAGE = 12  # layers stored sparse where that is smaller


class Technique:
    """One compression technique; a subclass is registered with ``register``.

    ``section`` names its part of the Recipe and ``config`` its frozen dataclass (fields
    declared with ``param``, all defaulted); ``phase`` places ``apply`` in the pipeline,
    whose phases run in this order: student, pruning, low rank, sparsity, quantization
    set-up, fine-tune, final masks, float layers, weight sharing, embedding, quantize,
    sparse storage (final masks, float layers, quantize and sparse storage hold the steps
    scheduled with ``Context.later``; techniques of one phase run in registration order);
    ``stage`` names it in progress displays; ``searched`` maps the fields searched by
    default to their domain (or to a callable giving it, read when the space is built).

    ``apply(model, config, ctx)`` returns the model (in place or new) and may record facts
    (numbers, strings, booleans) in ``ctx.facts``; it raises ValueError saying why a
    combination cannot be applied. ``normalize(config, sections)`` returns the config
    with settings that cannot act under the rest of the recipe at their defaults
    (``sections`` holds the sections normalized before this one and the raw rest).
    ``label(config)`` is the short text of the front ("" when the technique is off).
    ``settled(config)`` is the fraction of the fine-tune after which the technique no longer
    changes the model (a gradual schedule), so quality measured before it says little.
    """

    section: ClassVar[str]
    config: ClassVar[type]
    phase: ClassVar[Phase]
    stage: ClassVar[str]
    searched: ClassVar[Mapping[str, Any]] = {}

    def apply(self, model: nn.Module, config: Any, ctx: Context) -> nn.Module:
        raise NotImplementedError

    def normalize(self, config: Any, sections: Mapping[str, Any]) -> Any:
        return config

    def label(self, config: Any) -> str:
        return ""

    def settled(self, config: Any) -> float:
        return 0.0


_REGISTRY: dict[str, Technique] = {}


def register(technique: type[Technique]) -> type[Technique]:
    """Class decorator: add a technique to the registry (one per section)."""
    if technique.section in _REGISTRY:
        raise ValueError(f"a technique for recipe section {technique.section!r} is registered")
    if not isinstance(getattr(technique, "phase", None), Phase):
        raise ValueError(f"The 'phase' of {technique.__name__} must be a Phase. "
                         f"Got {getattr(technique, 'phase', None)!r} instead.")
    _REGISTRY[technique.section] = technique()
    return technique


def techniques() -> list[Technique]:
    """The registered techniques in pipeline order."""
    return sorted(_REGISTRY.values(), key=lambda t: t.phase)


def technique(section: str) -> Technique:
    if section not in _REGISTRY:
        raise ValueError(f"Unknown recipe section {section!r}; expected {sorted(_REGISTRY)}.")
    return _REGISTRY[section]


@dataclass
class Context:
    """What techniques share while one recipe is applied to a copy of the teacher.

    ``changed`` (a structural change) or ``needs_training`` (QAT) makes the fine-tune run;
    ``step_hooks`` run after each optimizer step as ``hook(model, step)``; ``model_hooks``
    run whenever a step returns a new model object (e.g. masks re-applied to an exported
    copy); ``float_layers`` are the layer names kept at float precision and
    ``layer_formats`` the format each weight layer is stored and run in (both set once the
    float layers are chosen; empty before). ``watch`` follows
    the fine-tune (see FineTuneWatch); when it stops it, ``stopped`` holds its reason and
    no later step of the pipeline runs. ``ranking`` wraps the importance that ranks
    channels for removal (see ``prune_channels``).
    """

    recipe: Any
    teacher: nn.Module
    example_input: Inputs
    train: Iterable
    calibration: Iterable | None
    finetune_steps: int
    learning_rate: float
    seed: int
    student_factory: Callable[[float, float], nn.Module] | None = None
    deadline: Deadline = field(default_factory=lambda: Deadline(None))
    on_stage: Callable[[str], None] = lambda _name: None
    facts: dict[str, Any] = field(default_factory=dict)
    changed: bool = False
    needs_training: bool = False
    float_layers: list[str] = field(default_factory=list)
    layer_formats: dict[str, str] = field(default_factory=dict)
    step_hooks: list[Callable[[nn.Module, int], None]] = field(default_factory=list)
    model_hooks: list[Callable[[nn.Module], None]] = field(default_factory=list)
    watch: FineTuneWatch | None = None
    ranking: Callable[[Any], Any] | None = None
    stopped: str | None = None
    _queue: list = field(default_factory=list)
    _ticket: Any = field(default_factory=itertools.count)
    _loss_cache: list = field(default_factory=list)
    _calibration_cache: dict = field(default_factory=dict)

    def later(self, phase: Phase, name: str, step: Step) -> None:
        """Run ``step(model, ctx)`` at ``phase`` of the pipeline (after the steps scheduled
        there before), named ``name`` in progress and budget messages."""
        heapq.heappush(self._queue, (phase, next(self._ticket), name, step))

    def loss(self, model: nn.Module) -> torch.Tensor:
        """The distillation loss of ``model`` on the first training batches."""
        if not self._loss_cache:
            for inputs, targets in islice(cycle(self.train), LOSS_BATCHES):
                with torch.no_grad():
                    self._loss_cache.append((inputs, targets, predict(self.teacher, inputs)))
        config = self.recipe.distillation
        total = sum(distillation_loss(predict(model, x), t, y, config)
                    for x, y, t in self._loss_cache)
        return total / len(self._loss_cache)

    def calibration_inputs(self, count: int) -> list[Inputs]:
        """The inputs of the first ``count`` calibration batches, topped up from ``train``
        (read once per count)."""
        if count not in self._calibration_cache:
            batches = (list(islice(self.calibration, count))
                       if self.calibration is not None else [])
            if len(batches) < count:
                batches += list(islice(cycle(self.train), count - len(batches)))
            self._calibration_cache[count] = [batch_inputs(b) for b in batches]
        return self._calibration_cache[count]

    def run(self, model: nn.Module) -> nn.Module:
        """Pop and run the scheduled steps in order; return the final model."""
        while self._queue and self.stopped is None:
            _phase, _ticket, name, step = heapq.heappop(self._queue)
            self.on_stage(name)
            result = step(model, self)
            if result is not model:
                for hook in self.model_hooks:
                    hook(result)
            model = result
            self.deadline.check(name)
        return model
