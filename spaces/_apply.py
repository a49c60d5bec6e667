"""Applying a whole Recipe to a teacher, in the one documented order."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from itertools import islice

import torch
from torch import nn

from ._attention import prune_heads, unfuse_attention
from ._cluster import cluster_weights
from ._distill import Deadline, _cycle, distill, distillation_loss
from ._lowrank import factorize
from ._quantize import convert_qat, prepare_qat, quantize
from ._recipe import Recipe
from ._sparse import SPARSE_MODULES, sparsify
from ._structure import (
    derive_student,
    drop_blocks,
    output_layers,
    prune_channels,
    run_with_hooks,
    sensitivity_ratios,
)
from ._unstructured import Sparsifier

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
LOSS_BATCHES = 4  # training batches behind Taylor gradients and sensitivity measurements


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compress(teacher: nn.Module, recipe: Recipe, *, example_input: torch.Tensor,
             train: Iterable, calibration: Iterable | None, finetune_steps: int,
             learning_rate: float, seed: int,
             student_factory: Callable[[float, float], nn.Module] | None = None,
             deadline: Deadline | None = None,
             on_stage: Callable[[str], None] | None = None) -> tuple[nn.Module, dict]:
    """Apply ``recipe`` to a copy of ``teacher``; return the compressed model and facts about it.

    Order: student (task factory if given, else the teacher with repeated blocks dropped
    to the depth and slimmed to the width) -> multi-head attention unfused into separate
    projections -> structured pruning (attention heads, then channels) -> low-rank
    factorization -> unstructured sparsity masks -> [QAT: fake quantization inserted] ->
    distillation fine-tune from the teacher (skipped when nothing changed; gradual
    sparsity follows its schedule here) -> weight sharing (k-means) -> quantization (or
    QAT conversion) -> sparse storage of layers where CSR / BSR is smaller. The teacher
    is not modified. The same recipe, seed and data give the same model. A combination
    that cannot be applied raises ValueError saying why. The facts are numbers, strings
    and booleans.
    """
    stage = on_stage or (lambda _name: None)
    deadline = deadline or Deadline(None)
    q, s, p = recipe.quantization, recipe.sparsity, recipe.pruning
    if q.qat and recipe.distillation.feature_weight > 0:
        raise ValueError("feature distillation cannot run with QAT: the QAT graph exposes no "
                         "layer to read features from; set feature_weight = 0 or qat = false")
    torch.manual_seed(seed)
    teacher.eval()
    loss = _loss_on(teacher, train, recipe)
    facts: dict = {}

    stage("student")
    width, depth = recipe.student.width, recipe.student.depth
    if student_factory is not None:
        model = student_factory(width, depth)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"the task's student factory returned {type(model).__name__}, expected "
                "an nn.Module"
            )
        model = copy.deepcopy(model)
    else:
        model = copy.deepcopy(teacher)
        facts["blocks_removed"] = drop_blocks(model, example_input, depth)
        if width < 1.0:
            model = derive_student(model, example_input, width, round_to=p.round_to)
    model.eval()
    changed = student_factory is not None or width < 1.0 or depth < 1.0
    # q / k / v as Linear layers: quantized, pruned, factorized like every other layer
    # (nn.MultiheadAttention's fused input projection stays float under int8)
    unfuse_attention(model)
    deadline.check("student")

    stage("prune")
    if p.heads > 0:
        facts["heads_removed"] = prune_heads(model, p.heads, criterion=p.criterion,
                                             global_ranking=p.allocation == "global",
                                             loss=loss)
        changed = True
    if p.ratio > 0:
        layer_ratios = None
        if p.allocation == "sensitivity":
            ratios = sensitivity_ratios(model, example_input, p.ratio, loss)
            layer_ratios = {model.get_submodule(n): r for n, r in ratios.items()}
        prune_channels(model, example_input, p.ratio, global_ranking=p.allocation == "global",
                       round_to=p.round_to, criterion=p.criterion, layer_ratios=layer_ratios,
                       loss=loss)
        changed = True
    deadline.check("pruning")

    stage("low-rank")
    r = recipe.low_rank
    model, factorized = factorize(model, r.rank_fraction, r.energy, r.conv)
    changed |= factorized > 0
    deadline.check("low-rank factorization")

    sparsifier = None
    if s.ratio > 0:
        stage("sparsify")
        sparsifier = Sparsifier(model, s, steps=finetune_steps,
                                exclude=output_layers(model, example_input), seed=seed)
        sparsifier.start(model, loss)
        changed = True
        deadline.check("sparsity")

    calibration_inputs = _calibration(calibration, train, q.calibration_batches)
    keep: list[str] = []
    trained = model
    if q.qat:
        stage("prepare QAT")
        if finetune_steps <= 0:
            raise ValueError("QAT learns its quantization ranges during the fine-tune and "
                             "needs fine-tune steps > 0")
        keep = float_layers(model, example_input, q.keep_float, calibration_inputs[:2],
                            q.scheme, q.cluster_bits)
        if keep:
            model = _fold_batchnorm(model)
        trained = prepare_qat(model, example_input, granularity=q.granularity,
                              keep_float=keep)
        if sparsifier is not None:
            sparsifier.apply(trained)
    steps = finetune_steps if changed or q.qat else 0
    if steps:
        stage("fine-tune")
        on_step = None
        if sparsifier is not None:
            def on_step(step, _loss):
                sparsifier.step(trained, step)
        distill(trained, teacher, train, steps=steps, config=recipe.distillation,
                learning_rate=learning_rate, seed=seed, deadline=deadline, on_step=on_step)
    trained.eval()
    if sparsifier is not None:
        sparsifier.apply(trained)
        facts["sparsity"] = round(sparsifier.sparsity(), 6)
    params = count_parameters(trained)

    if q.qat:
        stage("quantize")
        compressed = convert_qat(trained)
    else:
        if q.keep_float != "none":
            keep = float_layers(model, example_input, q.keep_float, calibration_inputs[:2],
                                q.scheme, q.cluster_bits)
        reference = _outputs(model, example_input)
        if q.cluster_bits:
            stage("weight sharing")
            clustered = cluster_weights(model, q.cluster_bits, skip=frozenset(keep), seed=seed)
            facts["clustered_layers"] = len(clustered)
            facts["cluster_bits"] = q.cluster_bits
        stage("quantize")
        compressed = quantize(model, q.scheme, example_input, calibration_inputs,
                              granularity=q.granularity, keep_float=keep)
        facts["quantization_error"] = _relative_error(_outputs(compressed, example_input),
                                                      reference)
    deadline.check("quantization")
    if q.keep_float != "none":
        facts["float_layers"] = ",".join(keep)
        facts["float_layer_count"] = len(keep)

    if s.ratio > 0:
        stored = sparsify(compressed, blocksize=s.block)
        facts["sparse_layers"] = len(stored)
        layouts = {m.layout for m in compressed.modules() if isinstance(m, SPARSE_MODULES)}
        facts["sparse_layout"] = ",".join(sorted(layouts)) or "dense"
    if q.scheme == "int8_static" and not q.qat:
        facts["calibration_batches"] = len(calibration_inputs)
    return compressed, {
        "parameters": params,
        "factorized_layers": factorized,
        "finetune_steps": steps,
        **facts,
    }


def _fold_batchnorm(model: nn.Module) -> nn.Module:
    """The model with each BatchNorm folded into the convolution before it (torch.fx);
    PT2E's QAT cannot leave a Conv-BatchNorm pair in float otherwise."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model.eval())
    except Exception as exc:
        raise ValueError(f"QAT with float layers folds BatchNorm into convolutions first, and "
                         f"torch.fx could not trace this model: {exc}") from exc


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x.clone()).float()


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    error = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
    if not math.isfinite(error):
        raise FloatingPointError(f"the quantized model's outputs are not finite ({error})")
    return round(error, 6)


def _calibration(calibration: Iterable | None, train: Iterable, count: int
                 ) -> list[torch.Tensor]:
    """The inputs of the first ``count`` calibration batches, topped up from ``train``."""
    batches = list(islice(calibration, count)) if calibration is not None else []
    if len(batches) < count:
        batches += list(islice(_cycle(train), count - len(batches)))
    return [b[0] if isinstance(b, (tuple, list)) else b for b in batches]


def _loss_on(teacher: nn.Module, train: Iterable, recipe: Recipe
             ) -> Callable[[nn.Module], torch.Tensor]:
    """The distillation loss of a model on the first training batches (computed lazily)."""
    cache: list = []

    def loss(model: nn.Module) -> torch.Tensor:
        if not cache:
            for inputs, targets in islice(_cycle(train), LOSS_BATCHES):
                with torch.no_grad():
                    cache.append((inputs, targets, teacher(inputs)))
        total = sum(distillation_loss(model(x), t, y, recipe.distillation)
                    for x, y, t in cache)
        return total / len(cache)

    return loss


def float_layers(model: nn.Module, example_input: torch.Tensor, rule: str,
                 inputs: list[torch.Tensor], scheme: str, cluster_bits: int) -> list[str]:
    """Names of the Linear / Conv layers kept at float precision under ``rule``.

    ``first_last``: the first and the last layer called. ``sensitive``: the quarter of the
    layers (at least one) whose weights alone, rounded to the target precision (int8 per
    channel, bf16, or ``cluster_bits`` uniform levels), change the model's outputs on
    ``inputs`` the most. ``none``: no layer.
    """
    if rule == "none":
        return []
    order: list[nn.Module] = []
    run_with_hooks(model, [m for m in model.modules() if isinstance(m, _LAYERS)],
                   lambda mod, _i, _o: order.append(mod), example_input)
    names = {m: n for n, m in model.named_modules()}
    called = list(dict.fromkeys(order))
    if rule == "first_last":
        return sorted({names[called[0]], names[called[-1]]}) if called else []
    if rule != "sensitive":
        raise ValueError(f"keep_float must be 'none', 'first_last' or 'sensitive'. "
                         f"Got {rule!r} instead.")
    with torch.no_grad():
        reference = [model(x).float() for x in inputs]
        scores = []
        for layer in called:
            original = layer.weight.detach().clone()
            layer.weight.copy_(_rounded(original, scheme, cluster_bits))
            error = sum(_relative_error(model(x).float(), ref)
                        for x, ref in zip(inputs, reference, strict=True))
            layer.weight.copy_(original)
            scores.append(error)
    count = max(1, math.ceil(len(called) / 4))
    ranked = sorted(range(len(called)), key=lambda i: -scores[i])[:count]
    return sorted(names[called[i]] for i in ranked)


def _rounded(weight: torch.Tensor, scheme: str, cluster_bits: int) -> torch.Tensor:
    """``weight`` rounded as the target precision would (a cheap sensitivity proxy)."""
    if cluster_bits:
        levels = 2 ** cluster_bits
    elif scheme == "bf16":
        return weight.to(torch.bfloat16).float()
    else:
        levels = 256
    rows = weight.reshape(weight.shape[0], -1)
    scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / (levels / 2 - 0.5)
    return (torch.round(rows / scale) * scale).reshape(weight.shape)
