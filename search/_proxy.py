"""A candidate's figures predicted in a fraction of a second: quality read on a slice of the
elastic student with its numerics simulated, latency from the target's latency model, size
from its tensor shapes. Predictions guide the search; they are never shown as measurements."""

from __future__ import annotations

import copy
import itertools
import json
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..evaluators import LatencyModel, estimated_size_mb, layer_calls
from ..spaces import (
    ElasticStudent,
    Recipe,
    float_layers,
    kind_formats,
    layer_formats,
    shared_weight_layers,
    simulate_numerics,
    sliceable,
)
from ..spaces import model_io as io
from ._candidate_plan import structure_key
from ._measuring import Baseline, calibration_batches, latency_input, quality_of, val_slice
from ._spec import StudySpec
from ._task import Task

RECALIBRATION_BATCHES = 8  # training batches that re-estimate a slice's BatchNorm statistics
SIMULATION_BATCHES = 2  # calibration batches that set a simulated int8 layer's input range
# techniques a slice cannot show without fine-tuning: their candidates are not predicted
_UNPREDICTED = {"low_rank": ("rank_fraction", 1.0), "sparsity": ("ratio", 0.0)}


@dataclass(frozen=True)
class Prediction:
    """A candidate's predicted figures: ``quality`` on the validation slice shifted to the
    teacher's full-validation quality, ``latency_ms`` at the study's batch and threads,
    ``size_mb``, and how long scoring took."""

    quality: float
    quality_drop: float
    latency_ms: float
    speedup: float
    size_mb: float
    seconds: float

    def metrics(self) -> dict[str, Any]:
        return {"tier": "predicted", "quality": self.quality, "quality_drop": self.quality_drop,
                "latency_ms": self.latency_ms, "speedup": self.speedup, "size_mb": self.size_mb,
                "proxy_s": round(self.seconds, 3)}


def _images(batches: list) -> bool:
    inputs = [io.split_batch(b)[0] for b in batches]
    return all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in inputs)


def _channels_last(batches: list) -> list:
    """Image batches laid out channels-last (eager convolutions and pooling run faster);
    other batches as they are."""
    if not batches or not _images(batches):
        return batches
    return [(x.contiguous(memory_format=torch.channels_last), y)
            for x, y in map(io.split_batch, batches)]


def unpredicted(recipe: Recipe) -> str | None:
    """Why ``recipe`` cannot be predicted without a fine-tune (None: it can)."""
    for section, (key, off) in _UNPREDICTED.items():
        if getattr(getattr(recipe, section), key) != off:
            return f"{section}.{key} is not predicted without a fine-tune"
    if recipe.quantization.qat:
        return "quantization-aware training is not predicted without a fine-tune"
    return sliceable(recipe)


class CandidateScorer:
    """Scores recipes of ``spec``'s space on ``task`` (slices of ``elastic``, latencies of
    ``latency``); a structure's slice is computed once, and a recipe's predicted quality
    drop once per elastic student (``drops``, which its caller may keep: it does not
    depend on the latency target)."""

    def __init__(self, task: Task, spec: StudySpec, baseline: Baseline,
                 elastic: ElasticStudent, latency: LatencyModel,
                 drops: dict[str, float] | None = None):
        self.task, self.spec, self.baseline = task, spec, baseline
        self.drops = {} if drops is None else drops  # predicted drops by ``drop_key``
        self.elastic, self.latency = elastic, latency
        self.val = _channels_last(val_slice(task, spec.stopping.slice_samples))
        self.teacher_slice_quality = quality_of(task, task.model, self.val)
        self.train = list(itertools.islice(itertools.cycle(task.train), RECALIBRATION_BATCHES))
        self.calibration = [io.batch_inputs(b) for b in itertools.islice(
            calibration_batches(task), SIMULATION_BATCHES)]
        self.example = latency_input(task, spec.latency)
        self._slices: dict[str, nn.Module] = {}
        self.teacher_calls = layer_calls(task.model, self.example,
                                         layer_formats(task.model, "fp32"))

    def structure(self, recipe: Recipe) -> nn.Module:
        """The recalibrated slice of ``recipe``'s structure, or the teacher itself when the
        structure is the teacher's (shared: do not modify it)."""
        key = structure_key(recipe)
        if key not in self._slices:
            model = self.elastic.slice(recipe)
            if self.is_teacher(model):
                model = self.task.model
            else:
                self.elastic.recalibrate(model, self.train)
            self._slices[key] = model
        return self._slices[key]

    def is_teacher(self, model: nn.Module) -> bool:
        """Whether ``model`` is the teacher or has its every parameter's shape."""
        shapes = [p.shape for p in model.parameters()]
        return model is self.task.model or shapes == [p.shape for p in
                                                      self.task.model.parameters()]

    def formats(self, recipe: Recipe, structure: nn.Module) -> tuple[dict[str, str], list[str]]:
        """The format of each weight layer and the layers kept float."""
        q = recipe.quantization
        kept = float_layers(structure, self.task.example_input, q.keep_float,
                            self.calibration, q.scheme, recipe.weight_sharing.bits)
        return layer_formats(structure, q.scheme, kept, kind_formats(q)), kept

    def score(self, recipe: Recipe) -> Prediction:
        """The predicted figures of ``recipe`` (ValueError when it cannot be predicted)."""
        reason = unpredicted(recipe)
        if reason is not None:
            raise ValueError(reason)
        started = time.perf_counter()
        structure = self.structure(recipe)
        formats, kept = self.formats(recipe, structure)
        bits = recipe.weight_sharing.bits
        clustered = shared_weight_layers(formats, kept) if bits else frozenset()
        key = self.drop_key(recipe)
        if key not in self.drops:
            simulated = simulate_numerics(copy.deepcopy(structure), formats, self.calibration,
                                          cluster_bits=bits, clustered=clustered)
            if _images(self.val):
                simulated = simulated.to(memory_format=torch.channels_last)  # 1.6x faster
            self.drops[key] = max(0.0, self.teacher_slice_quality
                                  - quality_of(self.task, simulated, self.val))
        drop = self.drops[key]
        latency = self.latency_ms(recipe, structure, formats)
        teacher = self.latency.predict(self.teacher_calls)
        return Prediction(
            quality=self.baseline.quality - drop, quality_drop=drop, latency_ms=latency,
            speedup=teacher / latency if latency > 0 else float("nan"),
            size_mb=estimated_size_mb(structure, formats, cluster_bits=bits,
                                      clustered=clustered),
            seconds=time.perf_counter() - started)

    def drop_key(self, recipe: Recipe) -> str:
        """What a predicted quality drop depends on besides the elastic student: the
        recipe and the held-out slice."""
        return json.dumps([self.spec.stopping.slice_samples, recipe.to_dict()],
                          sort_keys=True)

    def latency_ms(self, recipe: Recipe, structure: nn.Module | None = None,
                   formats: dict[str, str] | None = None) -> float:
        """The latency model's prediction for ``recipe`` (its structure and formats)."""
        structure = structure if structure is not None else self.structure(recipe)
        if formats is None:
            formats, _ = self.formats(recipe, structure)
        return self.latency.predict(layer_calls(structure, self.example, formats))
