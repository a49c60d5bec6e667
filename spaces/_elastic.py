"""A weight-sharing elastic student: one set of weights of which every structure the student
and pruning sections give is a slice, trained once by sandwich distillation from the teacher."""

from __future__ import annotations

import copy
import hashlib
import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ._layers import canonicalize
from ._model_io import Inputs, batch_inputs, predict, to_floating
from ._recipe import Recipe
from ._technique import Context, Phase, techniques
from ._training import Deadline, cycle, distillation_loss

_STRUCTURAL = (Phase.STUDENT, Phase.PRUNING)
_FORMAT = 1


def sliceable(recipe: Recipe, student_factory: Callable | None = None) -> str | None:
    """Why the student and pruning sections of ``recipe`` are no slice of an elastic student
    (None when they are). Only those two sections are read."""
    pruning = recipe.pruning
    if student_factory is not None and (recipe.student.width < 1 or recipe.student.depth < 1):
        return "the task's student factory builds its own networks, not slices of the teacher"
    if pruning.heads > 0:
        return "attention heads are ranked apart from channels (pruning.heads > 0)"
    if pruning.ratio > 0 and pruning.allocation == "sensitivity":
        return "sensitivity allocation measures each layer's loss on the weights being sliced"
    if pruning.ratio > 0 and pruning.criterion == "taylor":
        return "the 'taylor' criterion ranks by gradients, which slices do not share"
    return None


class _Reference(tp.importance.Importance):
    """Ranks a group of a position-coded model as ``base`` ranks the reference values at
    those positions: the teacher's ranking, whatever the elastic weights became."""

    def __init__(self, base: tp.importance.Importance, values: torch.Tensor):
        self.base, self.values = base, values

    def __call__(self, group, **kwargs):
        coded = {}
        for dep, _ in group:
            layer = dep.layer
            if isinstance(layer, nn.Module):
                for p in layer.parameters(recurse=False):
                    coded.setdefault(id(p), (p, p.data))
        for p, codes in coded.values():
            p.data = self.values[codes.long()]
        try:
            return self.base(group, **kwargs)
        finally:
            for p, codes in coded.values():
                p.data = codes


@dataclass(frozen=True)
class _Plan:
    """A structure: its module (values unset) and, per tensor, the positions it takes of
    the elastic parameters (``params``) or floating buffers (``buffers``)."""

    skeleton: nn.Module
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]

    def size(self) -> int:
        return sum(i.numel() for i in self.params.values())


def _floating_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner), attr)


def _positions(codes: torch.Tensor, low: int, high: int, name: str) -> torch.Tensor:
    """The integer positions held by ``codes``, checked to be distinct elements of
    ``[low, high)`` (a structural step that computed values would break this)."""
    index = codes.detach().long()
    valid = (torch.equal(index.double(), codes.detach()) and bool((index >= low).all())
             and bool((index < high).all()) and index.unique().numel() == index.numel())
    if not valid:
        raise ValueError(f"cannot slice {name!r}: a structural step computed its values "
                         "instead of selecting elements of the teacher's")
    return index - low


def _functional(module: nn.Module, tensors: dict[str, torch.Tensor], *args, **kwargs):
    return torch.func.functional_call(module, tensors, args, kwargs)


class ElasticStudent:
    """Shared weights (a copy of the teacher, then trained) of which each structure of the
    student and pruning sections is a slice: the network ``compress`` builds from the
    teacher for those sections, with the same layers, shapes and kept channels (ranked on
    the teacher's weights, fixed however training changes the shared ones).

    ``slice(recipe)`` gives a standalone model (run ``recalibrate`` before scoring one
    whose structure differs from the teacher's); ``train`` distills the shared weights by
    the sandwich rule; ``save`` / ``load`` keep them. Recipes that ``sliceable`` rejects
    raise ValueError.
    """

    def __init__(self, teacher: nn.Module, example_input: Inputs):
        self.teacher = teacher.eval()
        self.example_input = example_input
        self.model = canonicalize(copy.deepcopy(teacher)).eval()
        self.steps = 0
        # the teacher's values over the position codes: what channels are ranked by
        self.reference = self._flat(self.model, buffers=True).detach().clone()
        self._plans: dict[tuple, _Plan] = {}

    @staticmethod
    def _flat(model: nn.Module, buffers: bool = False) -> torch.Tensor:
        parts = [p.reshape(-1) for p in model.parameters()]
        if buffers:
            parts += [b.reshape(-1).to(parts[0].dtype) for _, b in _floating_buffers(model)]
        return torch.cat(parts)

    def _coded(self) -> tuple[nn.Module, int, int]:
        """A float64 copy of the elastic model whose every element holds its position;
        with the number of parameter elements and of all elements."""
        coded = copy.deepcopy(self.model).double()
        tensors = list(coded.parameters()) + [b for _, b in _floating_buffers(coded)]
        offset, params = 0, sum(p.numel() for p in coded.parameters())
        with torch.no_grad():
            for t in tensors:
                t.copy_(torch.arange(offset, offset + t.numel(), dtype=torch.float64
                                     ).view_as(t))
                offset += t.numel()
        if offset >= 2 ** 53:
            raise ValueError("cannot slice a model of more than 2^53 elements")
        return coded, params, offset

    def plan(self, recipe: Recipe) -> _Plan:
        """The structure of ``recipe``'s student and pruning sections (built once)."""
        key = (recipe.student, recipe.pruning)
        if key not in self._plans:
            reason = sliceable(recipe)
            if reason is not None:
                raise ValueError(f"cannot slice {recipe.short() or 'this recipe'}: {reason}")
            self._plans[key] = self._build(recipe)
        return self._plans[key]

    def _build(self, recipe: Recipe) -> _Plan:
        coded, params, total = self._coded()
        reference = self.reference.float()
        ctx = Context(recipe=recipe, teacher=coded, train=(), calibration=None,
                      example_input=to_floating(self.example_input, torch.float64),
                      finetune_steps=0, learning_rate=0.0, seed=0,
                      ranking=partial(_Reference, values=reference))
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # layers built on the way keep exact codes
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for t in techniques():
                    if t.phase in _STRUCTURAL:
                        coded = t.apply(coded, getattr(recipe, t.section), ctx)
        finally:
            torch.set_default_dtype(default)
        index = {n: _positions(p, 0, params, n) for n, p in coded.named_parameters()}
        buffers = {n: _positions(b, params, total, n) for n, b in _floating_buffers(coded)}
        return _Plan(coded.float().eval(), index, buffers)

    def _flats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared parameters and floating buffers, each as one flat tensor."""
        bufs = [b.reshape(-1) for _, b in _floating_buffers(self.model)]
        flat = self._flat(self.model)
        return flat, torch.cat(bufs) if bufs else flat.new_empty(0)

    @staticmethod
    def _gather(plan: _Plan, flats: tuple[torch.Tensor, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        flat, stats = flats
        return ({n: flat[i] for n, i in plan.params.items()}
                | {n: stats[i] for n, i in plan.buffers.items()})

    def slice(self, recipe: Recipe) -> nn.Module:
        """A standalone copy (eval mode) of the structure of ``recipe``'s student and
        pruning sections, holding the shared weights' current values."""
        plan = self.plan(recipe)
        model = copy.deepcopy(plan.skeleton)
        with torch.no_grad():
            for name, value in self._gather(plan, self._flats()).items():
                _tensor(model, name).copy_(value)
        return model.eval()

    @staticmethod
    def recalibrate(model: nn.Module, batches: Iterable) -> nn.Module:
        """Re-estimate the BatchNorm statistics of ``model`` on ``batches`` (batches or bare
        inputs), in place, as exact averages; return it in eval mode."""
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: every batch weighs the same
        model.train()
        with torch.no_grad():
            for batch in batches:
                predict(model, batch_inputs(batch))
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        return model.eval()

    def train(self, structures: Sequence[Recipe], batches: Iterable, steps: int, *,
              distillation: Any, learning_rate: float, seed: int = 0,
              deadline: Deadline | None = None,
              on_step: Callable[[int, int], None] | None = None) -> list[float]:
        """Distill the shared weights from the teacher for ``steps`` steps: each step sums
        the loss (``distillation_loss`` under ``distillation``: temperature, alpha) of the
        teacher's structure, the smallest of ``structures`` and two drawn from them, and
        takes one AdamW step (cosine-decayed ``learning_rate``). Returns the smallest
        structure's loss at each step; past ``deadline``, BudgetExceeded."""
        plans = [self.plan(r) for r in structures]
        if not plans:
            raise ValueError("elastic training needs at least one structure to train")
        largest, smallest = self.plan(Recipe()), min(plans, key=_Plan.size)
        generator = torch.Generator().manual_seed(seed)
        params = list(self.model.parameters())
        optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * k / max(1, steps))))
        deadline = deadline or Deadline(None)
        losses = []
        for step, (inputs, targets) in enumerate(islice(cycle(batches), steps)):
            drawn = torch.randint(len(plans), (2,), generator=generator).tolist()
            chosen = [largest, smallest] + [plans[i] for i in drawn]
            optimizer.zero_grad(set_to_none=True)
            losses.append(self._sandwich(chosen, inputs, targets, distillation))
            optimizer.step()
            schedule.step()
            self.steps += 1
            deadline.check("elastic training")
            if on_step is not None:
                on_step(step + 1, steps)
        self.model.eval()
        return losses

    def _sandwich(self, plans: list[_Plan], inputs: Inputs, targets: torch.Tensor,
                  distillation: Any) -> float:
        """Back-propagate the summed loss of ``plans``; return the second one's."""
        with torch.no_grad():
            teacher_logits = predict(self.teacher, inputs)
        flats = self._flats()
        losses = [distillation_loss(self.forward(plan, inputs, train=True, flats=flats),
                                    teacher_logits, targets, distillation) for plan in plans]
        total = sum(losses)
        if not torch.isfinite(total):
            raise FloatingPointError(f"elastic training loss became {float(total)}")
        total.backward()
        return losses[1].item()

    def forward(self, plan: _Plan, inputs: Inputs, train: bool = False,
                flats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The logits of ``plan``'s structure on ``inputs``, differentiable in the shared
        weights (BatchNorm on batch statistics when ``train``)."""
        plan.skeleton.train(train)
        tensors = self._gather(plan, flats or self._flats())
        # counters (BatchNorm's batches tracked) on copies: the skeleton stays as planned
        tensors |= {n: b.clone() for n, b in plan.skeleton.named_buffers()
                    if not b.is_floating_point()}
        try:
            return predict(partial(_functional, plan.skeleton, tensors), inputs)
        finally:
            plan.skeleton.eval()

    def save(self, path: str | Path) -> None:
        """Write the shared weights, the reference values ranking channels and the step
        count to ``path`` (atomically; plain tensors, readable with weights_only)."""
        state = {"format": _FORMAT, "steps": self.steps, "reference": self.reference,
                 "tensors": {n: t.detach().clone() for n, t in self.model.state_dict().items()}}
        path = Path(path)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(state, temporary)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str | Path, teacher: nn.Module, example_input: Inputs
             ) -> ElasticStudent:
        """The elastic student ``save`` wrote for ``teacher``."""
        state = torch.load(path, weights_only=True)
        elastic = cls(teacher, example_input)
        if state.get("format") != _FORMAT or state["reference"].shape != elastic.reference.shape:
            raise ValueError(f"cannot load the elastic student {path}: it was saved in another "
                             "format or for another teacher")
        elastic.model.load_state_dict(state["tensors"])
        elastic.reference, elastic.steps = state["reference"], int(state["steps"])
        return elastic

    @staticmethod
    def cache_key(teacher: nn.Module, **settings: Any) -> str:
        """A short hash of the teacher's tensors and ``settings`` (e.g. steps, learning
        rate, the structures' ranges), for a cache file name."""
        digest = hashlib.sha256()
        for name, tensor in teacher.state_dict().items():
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        digest.update(repr(sorted(settings.items())).encode())
        return digest.hexdigest()[:16]
