"""Attention heads as removable units, whatever holds them: ``UnfusedAttention``, the
self-attention of Hugging Face models (separate or fused query / key / value projections),
ranked and removed across a model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._attention import (
    UnfusedAttention,
    checked_heads,
    head_rows,
    keep_columns,
    keep_rows,
    slice_heads,
    unfuse_attention,
)
from ._training import Loss

# q / k / v projections of Hugging Face self-attention modules, their output projection
# when the module holds it, and the attributes holding their head count and head size:
# BERT, RoBERTa and their kin (the output in the sibling ``output.dense``); DistilBERT;
# models in transformers' newer style (ViT among them)
_HF_PROJECTIONS = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"),
                   ("q_proj", "k_proj", "v_proj"))
_HF_OUTPUTS = ("out_lin", "o_proj", "out_proj")
_HF_HEAD_COUNTS = ("num_attention_heads", "n_heads", "num_heads")
_HF_HEAD_SIZES = ("attention_head_size", "head_dim")


class HFHeads:
    """The heads of a Hugging Face ``transformers`` self-attention module, as removable
    units: its q / k / v projections and its output projection (its own, else the sibling
    ``output.dense`` of BERT-style models). Removing heads, or shrinking every head evenly,
    keeps the module's head count and head size attributes in step; the attention's
    scaling stays the trained one."""

    def __init__(self, module: nn.Module, projections: list[nn.Linear], out: nn.Linear,
                 count: str, size: str):
        self.module, self.out_proj = module, out
        self.q_proj, self.k_proj, self.v_proj = projections
        self._count, self._size = count, size

    @property
    def num_heads(self) -> int:
        return int(getattr(self.module, self._count))

    def keep_heads(self, heads: Sequence[int]) -> None:
        """Keep only ``heads`` (indices among the current heads, at least one), in place."""
        heads = slice_heads(self, heads)
        setattr(self.module, self._count, len(heads))
        self.refresh()

    def refresh(self) -> None:
        """Set the module's head size (and total) from its query projection's width, after
        Torch-Pruning shrank every head evenly."""
        width = self.q_proj.out_features
        setattr(self.module, self._size, width // self.num_heads)
        if hasattr(self.module, "all_head_size"):
            self.module.all_head_size = width


class FusedHeads:
    """The heads of a self-attention module whose query, key and value come from one
    projection split in three equal parts (GPT-2's ``c_attn``, read with ``split_size``
    and ``head_dim``; its output ``c_proj``), as removable units. Removing heads, or
    shrinking every head evenly, keeps ``split_size``, ``head_dim`` and ``num_heads``
    in step."""

    def __init__(self, module: nn.Module, qkv: nn.Linear, out: nn.Linear):
        self.module, self.qkv, self.out_proj = module, qkv, out

    @property
    def num_heads(self) -> int:
        return int(self.module.num_heads)

    def weights(self, grad: bool = False) -> list[torch.Tensor | None]:
        """The query, key, value and output weights (or their gradients)."""
        fused = self.qkv.weight.grad if grad else self.qkv.weight
        out = self.out_proj.weight.grad if grad else self.out_proj.weight
        return [*(fused.chunk(3) if fused is not None else (None,) * 3), out]

    def keep_heads(self, heads: Sequence[int]) -> None:
        """Keep only ``heads`` (indices among the current heads, at least one), in place."""
        heads = checked_heads(heads, self.num_heads)
        width = self.qkv.out_features // 3
        rows = head_rows(heads, width // self.num_heads)
        with torch.no_grad():
            keep_rows(self.qkv, torch.cat([rows + part * width for part in range(3)]))
            keep_columns(self.out_proj, rows)
        self.module.num_heads = len(heads)
        self.refresh()

    def refresh(self) -> None:
        """Set the split and head sizes from the fused projection's width (channel pruning
        leaves that width as it is)."""
        width = self.qkv.out_features // 3
        self.module.split_size = width
        self.module.head_dim = width // self.num_heads


def _fused_attention(module: nn.Module) -> FusedHeads | None:
    qkv, out = getattr(module, "c_attn", None), getattr(module, "c_proj", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(out, nn.Linear)
            and all(isinstance(vars(module).get(a), int)
                    for a in ("num_heads", "head_dim", "split_size"))
            and not getattr(module, "is_cross_attention", False)
            and qkv.out_features == 3 * module.split_size):
        return None
    return FusedHeads(module, qkv, out)


def hf_attentions(model: nn.Module) -> list[HFHeads | FusedHeads]:
    """The Hugging Face self-attention modules of ``model`` (see ``HFHeads`` and
    ``FusedHeads``)."""
    modules = dict(model.named_modules())
    found: list[HFHeads | FusedHeads] = []
    for name, module in modules.items():
        if isinstance(module, UnfusedAttention | nn.MultiheadAttention):
            continue
        fused = _fused_attention(module)
        if fused is not None:
            found.append(fused)
            continue
        count = _attribute(module, _HF_HEAD_COUNTS)
        size = _attribute(module, _HF_HEAD_SIZES)
        if count is None or size is None:
            continue
        for names in _HF_PROJECTIONS:
            layers = [getattr(module, n, None) for n in names]
            if not all(isinstance(layer, nn.Linear) for layer in layers):
                continue
            out = next((getattr(module, n) for n in _HF_OUTPUTS
                        if isinstance(getattr(module, n, None), nn.Linear)), None)
            if out is None:
                parent = modules.get(name.rpartition(".")[0])
                out = getattr(getattr(parent, "output", None), "dense", None)
            if isinstance(out, nn.Linear):
                found.append(HFHeads(module, layers, out, count, size))
            break
    return found


def _attribute(module: nn.Module, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` that ``module`` holds as an int attribute."""
    return next((n for n in names if isinstance(vars(module).get(n), int)), None)



def _by_head(attention: UnfusedAttention, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The q / k / v / ``out_proj`` weight-shaped ``tensors`` as one row per head."""
    h = attention.num_heads
    q, k, v, out = tensors
    columns = out.view(out.shape[0], h, -1).transpose(0, 1)
    return torch.cat([t.reshape(h, -1) for t in (q, k, v, columns)], dim=1)


def _weights(attention, grad: bool = False) -> list[torch.Tensor | None]:
    if isinstance(attention, FusedHeads):
        return attention.weights(grad)
    layers = (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj)
    return [layer.weight.grad if grad else layer.weight for layer in layers]


def head_importance(attention: UnfusedAttention | HFHeads | FusedHeads,
                    criterion: str) -> torch.Tensor:
    """One score per head from its q / k / v rows and ``out_proj`` columns: their L2 or L1
    norm, or for ``taylor`` the sum of |w * dL/dw| (gradients must be present)."""
    weights = _by_head(attention, _weights(attention))
    if criterion == "taylor":
        grads = _weights(attention, grad=True)
        if any(g is None for g in grads):
            raise ValueError("the 'taylor' criterion needs gradients of the attention weights")
        return (weights * _by_head(attention, grads)).abs().sum(dim=1)
    return weights.norm(p=1 if criterion == "l1" else 2, dim=1)


def prune_heads(model: nn.Module, ratio: float, *, global_ranking: bool,
                criterion: str = "l2", loss: Loss | None = None) -> int:
    """Remove ``ratio`` of the attention heads, whole, in place; return how many went.

    Every ``nn.MultiheadAttention`` becomes an ``UnfusedAttention`` first (the residual
    stream keeps its width); the self-attention of Hugging Face encoders loses heads in
    place (``HFHeads``). Heads are ranked by ``criterion`` (``l2`` / ``l1`` norm of
    the head's weights, ``taylor`` with gradients of ``loss``; ``bn_scale`` ranks heads
    by L2, attention having no BatchNorm): across all attention modules, each module's
    scores divided by their mean, when ``global_ranking``; else ``ratio`` of each
    module's heads go (halves round up). Every module keeps at least one head. Raises
    ValueError when the model has no multi-head attention.
    """
    modules: list = unfuse_attention(model) + hf_attentions(model)
    if not modules:
        raise ValueError(f"removing attention heads needs multi-head attention "
                         f"(nn.MultiheadAttention or a Hugging Face transformers self-attention), "
                         f"and {type(model).__name__} has none")
    if ratio == 0:
        return 0
    if criterion == "taylor":
        if loss is None:
            raise ValueError("the 'taylor' criterion needs a loss to take gradients of")
        model.zero_grad(set_to_none=True)
        loss(model).backward()
    with torch.no_grad():
        scores = [head_importance(m, "l2" if criterion == "bn_scale" else criterion)
                  for m in modules]
    model.zero_grad(set_to_none=True)
    removed: list[set[int]] = [set() for _ in modules]
    if global_ranking:
        normalized = [s / s.mean().clamp_min(1e-12) for s in scores]
        ranked = sorted((float(s), i, h) for i, ns in enumerate(normalized)
                        for h, s in enumerate(ns))
        budget = int(ratio * len(ranked) + 0.5)
        for _score, i, h in ranked:
            if budget == 0:
                break
            if len(removed[i]) < modules[i].num_heads - 1:
                removed[i].add(h)
                budget -= 1
    else:
        for i, s in enumerate(scores):
            count = min(int(ratio * len(s) + 0.5), len(s) - 1)
            removed[i] = set(torch.argsort(s)[:count].tolist())
    for module, gone in zip(modules, removed, strict=True):
        if gone:
            module.keep_heads([h for h in range(module.num_heads) if h not in gone])
    return sum(len(g) for g in removed)
