"""Student architecture: the teacher's repeated blocks dropped to a depth, slimmed to a width."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from ._attention import unfuse_attention
from ._config import Config, param
from ._domains import FloatRange
from ._structure import derive_student, drop_blocks
from ._technique import Context, Phase, Technique, register


@dataclass(frozen=True)
class StudentConfig(Config):
    """Width and depth multipliers of the student; 1.0 keeps the teacher's."""

    width: float = param(1.0, low=0.0, high=1.0, low_open=True)
    depth: float = param(1.0, low=0.0, high=1.0, low_open=True,
                         note="share of repeated blocks (else of "
                              "shape-keeping layers) kept")


@register
class Student(Technique):
    """The task's student factory when it has one, else the teacher with ``depth`` of its
    repeated blocks (or, without them, of its shape-keeping layers) kept and slimmed
    uniformly to ``width`` (weights inherited). Multi-head attention is unfused into
    separate q / k / v / output Linear layers, so every later technique treats them like
    any other layer (int8 would leave the fused one float)."""

    section, config, phase, stage = "student", StudentConfig, Phase.STUDENT, "student"
    searched = {"width": FloatRange(0.5, 1.0, 0.125)}

    def apply(self, model: nn.Module, config: StudentConfig, ctx: Context) -> nn.Module:
        width, depth = config.width, config.depth
        if ctx.student_factory is not None:
            model = ctx.student_factory(width, depth)
            if not isinstance(model, nn.Module):
                raise TypeError(f"the task's student factory returned {type(model).__name__}, "
                                "expected an nn.Module")
            model = copy.deepcopy(model)
            ctx.changed = True
        else:
            ctx.facts["blocks_removed"] = drop_blocks(model, ctx.example_input, depth)
            if width < 1.0:
                model = derive_student(model, ctx.example_input, width,
                                       round_to=ctx.recipe.pruning.round_to,
                                       ranking=ctx.ranking)
            ctx.changed |= width < 1.0 or depth < 1.0
        model.eval()
        unfuse_attention(model)
        return model

    def label(self, config: StudentConfig) -> str:
        return " ".join([f"width={config.width:g}"] * (config.width != 1.0)
                        + [f"depth={config.depth:g}"] * (config.depth != 1.0))
