"""Structural changes: students (width, depth) and structured pruning on the dependency graph."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
import torch_pruning as tp
from torch import nn

from ._attention import UnfusedAttention
from ._heads import FusedHeads, hf_attentions
from ._layers import is_weight_layer
from ._model_io import Inputs, logits, predict
from ._training import Loss

_ROOTS = [nn.modules.conv._ConvNd, nn.Linear]

Ranking = Callable[[tp.importance.Importance], tp.importance.Importance]
"""Wraps the importance of a criterion, e.g. to rank fixed reference values of the weights."""



def run_with_hooks(model: nn.Module, modules: Iterable[nn.Module], hook: Callable,
                   example_input: Inputs) -> torch.Tensor:
    """The model's logits on ``example_input`` without gradients, with ``hook`` a forward
    hook of each of ``modules`` during that call only."""
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            return predict(model, example_input)
    finally:
        for h in handles:
            h.remove()


def output_layers(model: nn.Module, example_input: Inputs) -> list[nn.Module]:
    """The Linear/Conv layers whose outputs are the model's outputs (never pruned).

    Falls back to the last Linear/Conv called when the output is produced by another op.
    """
    called: list[tuple[nn.Module, torch.Tensor]] = []

    def hook(module, _inputs, output):
        called.append((module, output))

    out = run_with_hooks(model, [m for m in model.modules() if is_weight_layer(m)],
                         hook, example_input)
    direct = [m for m, o in called if o is out]
    if direct:
        return direct
    return [called[-1][0]] if called else []


@contextmanager
def _traceable(model: nn.Module):
    """No key-value cache while Torch-Pruning traces the model: a decoder's cache update
    concatenates onto an empty cache, which the dependency graph cannot size."""
    config = getattr(model, "config", None)
    cached = getattr(config, "use_cache", None)
    if cached:
        config.use_cache = False
    try:
        yield model
    finally:
        if cached:
            config.use_cache = cached


def _importance(criterion: str, model: nn.Module) -> tp.importance.Importance:
    if criterion == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if criterion == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if criterion == "taylor":
        return tp.importance.TaylorImportance()
    if criterion == "bn_scale":
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise ValueError("the 'bn_scale' pruning criterion ranks channels by BatchNorm "
                             "scale, and this model has no BatchNorm layer")
        return tp.importance.BNScaleImportance()
    raise ValueError(f"The 'criterion' of structured pruning must be one of "
                     f"['l2', 'l1', 'taylor', 'bn_scale']. Got {criterion!r} instead.")


def _heads(model: nn.Module) -> int:
    """Least common multiple of the ``nn.MultiheadAttention`` head counts (the embedding,
    and so the residual stream, must stay divisible by it)."""
    counts = [m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    return math.lcm(*counts) if counts else 1


def _head_groups(model: nn.Module) -> dict[nn.Module, int]:
    """The q / k / v projections of each ``UnfusedAttention`` and Hugging Face
    self-attention with its head count: their outputs shrink by the same dimensions in
    every head."""
    attentions = [m for m in model.modules() if isinstance(m, UnfusedAttention)]
    return {layer: m.num_heads for m in attentions + hf_attentions(model)
            if not isinstance(m, FusedHeads) for layer in (m.q_proj, m.k_proj, m.v_proj)}


def _fixed_width(model: nn.Module, example_input: Inputs) -> list[nn.Module]:
    """The layers whose outputs keep their width under channel pruning: the output layers,
    and fused query / key / value projections (split along a dimension Torch-Pruning does
    not follow; their heads leave whole, by head pruning)."""
    fused = [m.qkv for m in hf_attentions(model) if isinstance(m, FusedHeads)]
    return output_layers(model, example_input) + fused


def prune_channels(model: nn.Module, example_input: Inputs, ratio: float, *,
                   global_ranking: bool, round_to: int | None = None, criterion: str = "l2",
                   layer_ratios: dict[nn.Module, float] | None = None,
                   loss: Loss | None = None, ranking: Ranking | None = None) -> nn.Module:
    """Physically remove ``ratio`` of the channels / neurons of every prunable group, in place.

    Channels are ranked by ``criterion`` (``l2`` / ``l1`` weight norm, ``taylor``
    |w * dL/dw| with gradients of ``loss``, ``bn_scale`` BatchNorm scale: network
    slimming) across the whole network when ``global_ranking`` (layers shrink unevenly),
    or within each layer otherwise; ``layer_ratios`` overrides the ratio of the groups
    led by the given layers. Consumers of a removed channel shrink to match
    (Torch-Pruning's dependency graph: residual adds, concatenations, BatchNorm,
    LayerNorm, grouped and depthwise convolutions, ``nn.MultiheadAttention``, whose
    embedding shrinks evenly across its heads; an ``UnfusedAttention`` shrinks its heads
    evenly, apart from the residual stream). Channel counts stay multiples of
    ``round_to`` (and of the ``nn.MultiheadAttention`` head counts). The output layer
    and fused query / key / value projections keep their widths. ``ranking`` wraps the
    criterion's importance.
    ``ratio == 0`` without ``layer_ratios`` returns the model untouched.
    """
    if ratio == 0 and not layer_ratios:
        return model
    importance = _importance(criterion, model)
    importance = ranking(importance) if ranking is not None else importance
    if criterion == "taylor" and loss is None:
        raise ValueError("the 'taylor' criterion needs a loss to take gradients of")
    was_training = model.training
    model.eval()
    step = math.lcm(round_to or 1, _heads(model))
    with warnings.catch_warnings(), _traceable(model):
        warnings.simplefilter("ignore")
        pruner = tp.pruner.BasePruner(
            model, example_input, importance=importance, global_pruning=global_ranking,
            pruning_ratio=ratio, pruning_ratio_dict=layer_ratios, max_pruning_ratio=0.95,
            ignored_layers=_fixed_width(model, example_input),
            round_to=step if step > 1 else None, num_heads=_head_groups(model),
            output_transform=logits)
        if criterion == "taylor":
            model.zero_grad(set_to_none=True)
            loss(model).backward()
        pruner.step()
        model.zero_grad(set_to_none=True)
    for attention in hf_attentions(model):
        attention.refresh()
    model.train(was_training)
    return model


def group_roots(model: nn.Module, example_input: Inputs) -> list[str]:
    """The names of the layers leading the model's prunable groups (the output layers
    excepted), in the order the forward pass calls them."""
    names = {m: n for n, m in model.named_modules()}
    with warnings.catch_warnings(), _traceable(model):
        warnings.simplefilter("ignore")
        graph = tp.DependencyGraph().build_dependency(model, example_input,
                                                      output_transform=logits)
        ignored = _fixed_width(model, example_input)
        roots = [group[0].dep.target.module for group in
                 graph.get_all_groups(ignored_layers=ignored, root_module_types=_ROOTS)]
    order = {m: i for i, m in enumerate(_call_shapes(model, roots, example_input))}
    return [names[m] for m in sorted(roots, key=lambda m: order.get(m, len(order)))]


def derive_student(teacher: nn.Module, example_input: Inputs, width: float,
                   depth: float = 1.0, round_to: int | None = None,
                   ranking: Ranking | None = None) -> nn.Module:
    """A copy of the teacher with ``depth`` of its repeated blocks (see ``drop_blocks``),
    slimmed uniformly to ``width`` of its channels (L2 ranking, wrapped by ``ranking``);
    weights inherited."""
    student = copy.deepcopy(teacher)
    if depth < 1.0:
        drop_blocks(student, example_input, depth)
    if width < 1.0:
        prune_channels(student, example_input, 1.0 - width, global_ranking=False,
                       round_to=round_to, ranking=ranking)
    return student


def _call_shapes(model: nn.Module, modules: list[nn.Module], example_input: Inputs
                 ) -> dict[nn.Module, list[tuple | None]]:
    """Per module, the (input shape, output shape) of each of its calls on
    ``example_input`` (None when either is not a tensor; of a tuple output, its first
    element, e.g. the hidden states of an encoder layer)."""
    shapes: dict[nn.Module, list[tuple | None]] = {}

    def hook(module, inputs, output):
        if isinstance(output, tuple | list) and output:
            output = output[0]
        tensors = (inputs and isinstance(inputs[0], torch.Tensor)
                   and isinstance(output, torch.Tensor))
        shapes.setdefault(module, []).append(
            (inputs[0].shape, output.shape) if tensors else None)

    run_with_hooks(model, modules, hook, example_input)
    return shapes


def _holds_weights(module: nn.Module) -> bool:
    return any(is_weight_layer(m) for m in module.modules())


def evenly_spaced(count: int, keep: int) -> list[int]:
    """``keep`` of the positions ``0 .. count - 1``, evenly spaced (first and last kept)."""
    if keep <= 0:
        return []
    return torch.linspace(0, count - 1, keep).round().long().tolist()


def repeated_blocks(model: nn.Module, example_input: Inputs
                    ) -> dict[str, list[int]]:
    """Containers holding repeated blocks: ``{container name: indices of its blocks}``.

    A block is a child of an ``nn.Sequential`` / ``nn.ModuleList`` that holds weights
    (a Linear / Conv inside), maps its input to an output of the same shape and shares
    its class with at least one such sibling; dropping it leaves the network valid.
    """
    containers = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, (nn.Sequential, nn.ModuleList))]
    shapes = _call_shapes(model, [c for _, m in containers for c in m], example_input)

    def keeps_shape(child: nn.Module) -> bool:
        calls = shapes.get(child)
        return bool(calls) and all(c is not None and c[0] == c[1] for c in calls)

    found = {}
    for name, container in containers:
        candidates = [i for i, c in enumerate(container)
                      if keeps_shape(c) and _holds_weights(c) and not is_weight_layer(c)]
        by_class: dict[type, list[int]] = {}
        for i in candidates:
            by_class.setdefault(type(container[i]), []).append(i)
        blocks = sorted(i for idx in by_class.values() if len(idx) >= 2 for i in idx)
        if blocks:
            found[name] = blocks
    return found


def layer_groups(model: nn.Module, example_input: Inputs) -> dict[str, list[range]]:
    """Single layers a plain network can drop: ``{Sequential name: child index ranges}``.

    A group is a child of an ``nn.Sequential`` holding a Linear / Conv whose output has
    its input's shape (e.g. a 3x3 convolution keeping channels and resolution), with the
    weightless shape-keeping children after it (its norm and activation). Groups that
    produce the model's output are never listed.
    """
    containers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Sequential)]
    calls = _call_shapes(model, [c for _, m in containers for c in m], example_input)
    shapes = {m: next((c for c in pairs if c is not None), None)  # its first tensor call
              for m, pairs in calls.items()}
    outputs = set(output_layers(model, example_input))
    found, claimed = {}, set()
    for name, container in containers:
        if container in claimed:  # inside a group found in an outer Sequential
            continue
        groups, i = [], 0
        while i < len(container):
            shape = shapes.get(container[i])
            if not (_holds_weights(container[i]) and shape and shape[0] == shape[1]):
                i += 1
                continue
            stop = i + 1
            while (stop < len(container) and shapes.get(container[stop]) == shape
                   and not _holds_weights(container[stop])):
                stop += 1
            if not any(m in outputs for c in container[i:stop] for m in c.modules()):
                groups.append(range(i, stop))
                claimed.update(m for c in container[i:stop] for m in c.modules())
            i = stop
        if groups:
            found[name] = groups
    return found


def drop_blocks(model: nn.Module, example_input: Inputs, depth: float) -> int:
    """Keep ``depth`` of the model's repeated blocks, or else of its single droppable
    layers, evenly spaced, and remove the others, in place; return how many were removed.

    Repeated blocks (``repeated_blocks``): ``ceil(depth * n)`` of each run are kept, at
    least one. Single layers (``layer_groups``, for a network without repeated blocks):
    ``floor(depth * n)`` of the model's ``n`` are kept, so any depth below 1 drops one.
    Raises ValueError when ``depth < 1`` and the model has neither (give the task a
    student factory for such models).
    """
    if depth >= 1.0:
        return 0
    found = repeated_blocks(model, example_input)
    if not found:
        return _drop_layers(model, example_input, depth)
    removed = 0
    for name, blocks in found.items():
        container = model.get_submodule(name)
        keep_count = max(1, math.ceil(depth * len(blocks)))
        keep = {blocks[p] for p in evenly_spaced(len(blocks), keep_count)}
        drop = set(blocks) - keep
        kept = [c for i, c in enumerate(container) if i not in drop]
        _keep_children(container, kept)
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if hasattr(owner, "num_layers") and attr == "layers":
            owner.num_layers = len(kept)  # nn.TransformerEncoder counts its layers
        removed += len(drop)
    return removed


def _drop_layers(model: nn.Module, example_input: Inputs, depth: float) -> int:
    found = layer_groups(model, example_input)
    groups = [(name, g) for name, gs in found.items() for g in gs]
    if not groups:
        raise ValueError(
            f"student depth {depth:g} < 1 needs repeated shape-preserving blocks (e.g. "
            f"residual blocks or encoder layers in a Sequential / ModuleList) or layers "
            f"that keep their input's shape, and {type(model).__name__} has neither; give "
            f"the task a student(width, depth) factory")
    kept = set(evenly_spaced(len(groups), math.floor(depth * len(groups) + 1e-9)))
    dropped = [group for i, group in enumerate(groups) if i not in kept]
    for name, group in sorted(dropped, key=lambda x: (x[0], -x[1].start)):
        container = model.get_submodule(name)
        _keep_children(container, [c for i, c in enumerate(container) if i not in group])
    return len(dropped)


def _keep_children(container: nn.Sequential | nn.ModuleList, kept: list[nn.Module]) -> None:
    """Leave ``kept`` as the container's children, renumbered from 0."""
    container._modules.clear()
    for i, child in enumerate(kept):
        container.add_module(str(i), child)
