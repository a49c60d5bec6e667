"""Unstructured pruning: weight masks ranked by magnitude, Taylor or random scores, applied
at once or on a polynomial (AGP) schedule during the recovery fine-tune."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ._config import Config, param
from ._layers import is_weight_layer
from ._sparse import SPARSE_MODULES, sparsify
from ._structure import output_layers
from ._technique import Context, Phase, Technique, register
from ._training import Loss

GRADUAL_END = 0.75  # share of the fine-tune over which gradual sparsity reaches its ratio
SparseCriterion = Literal["magnitude", "taylor", "random"]
SparseScope = Literal["global", "layer"]
SparseSchedule = Literal["one_shot", "gradual"]


@dataclass(frozen=True)
class SparsityConfig(Config):
    """Unstructured pruning: ``ratio`` of the Linear / Conv weights set to zero.

    Ranked by ``criterion`` (magnitude, first-order Taylor |w * grad|, random) across the
    network or per layer (``scope``), at once before the fine-tune or ``gradual``ly during
    it (polynomial schedule); ``block > 1`` removes square blocks (stored BSR).
    """

    ratio: float = param(0.0, low=0.0, high=0.99, off=True, note="unstructured")
    criterion: SparseCriterion = param("magnitude", choices=("magnitude", "taylor", "random"))
    scope: SparseScope = param("global", choices=("global", "layer"))
    schedule: SparseSchedule = param("one_shot", choices=("one_shot", "gradual"),
                                     note="gradual: polynomial, during the fine-tune")
    block: int = param(1, low=1, high=64, integer=True, note="square blocks, stored BSR")


def _matrix(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


class Sparsifier:
    """Masks over the Linear / Conv weights of a model, keyed by parameter name.

    Keyed by name, the masks also apply to an exported copy of the model (QAT), where
    ``torch.nn.utils.prune``'s forward hooks would not survive. Masks only grow: a
    pruned weight stays zero. ``block > 1`` ranks and removes square blocks of the
    weight matrix (a Conv's weight flattened to out x rest) where the block divides it.
    """

    def __init__(self, model: nn.Module, config: SparsityConfig, *, steps: int,
                 exclude: list[nn.Module] = (), seed: int = 0):
        self.config = config
        self.names = [f"{n}.weight" if n else "weight" for n, m in model.named_modules()
                      if is_weight_layer(m)
                      and not any(m is e for e in exclude)]
        if not self.names:
            raise ValueError("unstructured sparsity found no Linear / Conv weight to prune")
        params = dict(model.named_parameters())
        self.masks = {n: torch.ones_like(params[n], dtype=torch.bool) for n in self.names}
        generator = torch.Generator().manual_seed(seed)
        self.noise = ({n: torch.rand(params[n].shape, generator=generator) for n in self.names}
                      if config.criterion == "random" else None)
        gradual = config.schedule == "gradual" and steps > 0
        self.end = max(1, int(GRADUAL_END * steps)) if gradual else 0
        self.every = max(1, self.end // 10) if gradual else 1
        self.current = 0.0

    def target(self, step: int) -> float:
        """Sparsity due after ``step`` fine-tune steps: s * (1 - (1 - t / T)^3) (AGP)."""
        if self.end == 0 or step >= self.end:
            return self.config.ratio
        return self.config.ratio * (1.0 - (1.0 - step / self.end) ** 3)

    def start(self, model: nn.Module, loss: Loss | None = None) -> None:
        """Prune to the initial target (the full ratio when one-shot) and apply the masks."""
        if self.config.criterion == "taylor":
            if loss is None:
                raise ValueError("the 'taylor' sparsity criterion needs a loss")
            model.zero_grad(set_to_none=True)
            loss(model).backward()
        self._update(model, self.target(0))
        model.zero_grad(set_to_none=True)

    def step(self, model: nn.Module, step: int) -> None:
        """After optimizer step ``step`` (0-based): raise the sparsity on schedule, re-apply."""
        done = step + 1
        if self.end and done <= self.end and done % self.every == 0:
            self._update(model, self.target(done))
        else:
            self.apply(model)

    def apply(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, mask in self.masks.items():
                params[name].mul_(mask)

    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return sum(int((~m).sum()) for m in self.masks.values()) / total

    def _scores(self, name: str, param: torch.Tensor) -> torch.Tensor:
        criterion = self.config.criterion
        if criterion == "random":
            score = self.noise[name].clone()
        elif criterion == "taylor" and param.grad is not None:
            score = (param.detach() * param.grad.detach()).abs()
        else:  # magnitude, or Taylor before any gradient exists
            score = param.detach().abs()
        return score.float().masked_fill(~self.masks[name], -math.inf)

    def _units(self, name: str, param: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Scores per pruning unit (element or block) and the unit size."""
        b = self.config.block
        score = _matrix(self._scores(name, param))
        m, n = score.shape
        if b == 1 or m % b or n % b:
            return score.reshape(-1), 1
        blocks = score.reshape(m // b, b, n // b, b).permute(0, 2, 1, 3).reshape(-1, b * b)
        return blocks.mean(dim=1), b * b

    def _set(self, name: str, param: torch.Tensor, keep_units: torch.Tensor, size: int) -> None:
        b = int(math.isqrt(size))
        m, n = _matrix(param).shape
        if size == 1:
            mask = keep_units.reshape(param.shape)
        else:
            mask = (keep_units.reshape(m // b, n // b, 1, 1).expand(m // b, n // b, b, b)
                    .permute(0, 2, 1, 3).reshape(param.shape))
        self.masks[name] = self.masks[name] & mask

    def _update(self, model: nn.Module, sparsity: float) -> None:
        params = dict(model.named_parameters())
        units = {n: self._units(n, params[n]) for n in self.names}
        if self.config.scope == "layer":
            groups = [[n] for n in self.names]
        else:
            groups = [self.names]
        for group in groups:
            scores = torch.cat([units[n][0] for n in group])
            sizes = torch.cat([torch.full_like(units[n][0], units[n][1]) for n in group])
            budget = sparsity * float(sizes.sum())
            order = torch.argsort(scores, stable=True)
            pruned_sizes = torch.cumsum(sizes[order], dim=0)
            keep = torch.ones_like(scores, dtype=torch.bool)
            keep[order[pruned_sizes <= budget + 1e-6]] = False
            offset = 0
            for n in group:
                count = units[n][0].numel()
                self._set(n, params[n], keep[offset:offset + count], units[n][1])
                offset += count
        self.current = sparsity
        self.apply(model)


@register
class Sparsity(Technique):
    """Masks set before the fine-tune (or raised on schedule during it) and kept through
    it; after quantization, layers whose CSR / BSR storage is smaller are stored sparse."""

    section, config, phase, stage = "sparsity", SparsityConfig, Phase.SPARSITY, "sparsify"

    def apply(self, model: nn.Module, config: SparsityConfig, ctx: Context) -> nn.Module:
        if config.ratio == 0:
            return model
        sparsifier = Sparsifier(model, config, steps=ctx.finetune_steps,
                                exclude=output_layers(model, ctx.example_input), seed=ctx.seed)
        sparsifier.start(model, ctx.loss)
        ctx.changed = True
        ctx.step_hooks.append(sparsifier.step)
        ctx.model_hooks.append(sparsifier.apply)

        def final_masks(trained: nn.Module, _ctx: Context) -> nn.Module:
            ctx.model_hooks.remove(sparsifier.apply)  # quantized graphs have other weights
            sparsifier.apply(trained)
            ctx.facts["sparsity"] = round(sparsifier.sparsity(), 6)
            return trained

        def storage(compressed: nn.Module, _ctx: Context) -> nn.Module:
            ctx.facts["sparse_layers"] = len(sparsify(compressed, blocksize=config.block))
            layouts = {m.layout for m in compressed.modules() if isinstance(m, SPARSE_MODULES)}
            ctx.facts["sparse_layout"] = ",".join(sorted(layouts)) or "dense"
            return compressed

        ctx.later(Phase.FINAL_MASKS, "sparsify", final_masks)
        ctx.later(Phase.SPARSE_STORAGE, "sparse storage", storage)
        return model

    def normalize(self, config: SparsityConfig, sections: dict[str, Any]) -> SparsityConfig:
        return config if config.ratio > 0 else SparsityConfig()

    def settled(self, config: SparsityConfig) -> float:
        return GRADUAL_END if config.ratio > 0 and config.schedule == "gradual" else 0.0

    def label(self, config: SparsityConfig) -> str:
        if not config.ratio:
            return ""
        block = f",b{config.block}" if config.block > 1 else ""
        return (f"sparse={config.ratio:g}({config.criterion},{config.scope},"
                f"{config.schedule}{block})")
