"""Attention heads as removable units: multi-head attention with separate projections."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._training import Loss


class UnfusedAttention(nn.Module):
    """Multi-head attention with separate ``q_proj`` / ``k_proj`` / ``v_proj`` /
    ``out_proj`` Linear layers: a drop-in for ``nn.MultiheadAttention`` (same call, same
    outputs) whose heads can be removed.

    In ``nn.MultiheadAttention`` the heads' total width is the embedding width, which is
    also the residual stream of the surrounding block; here the inner width
    (``num_heads`` x head size) is independent of ``embed_dim``, so removing a head leaves
    the residual stream untouched. ``in_proj_bias`` is None, which keeps PyTorch's
    transformer layers off their fused fast path (written for ``nn.MultiheadAttention``).
    ``kept_heads`` are the indices of the remaining heads among the original ones (a
    per-head ``attn_mask`` is given for the original heads).
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *,
                 kdim: int | None = None, vdim: int | None = None, bias: bool = True,
                 dropout: float = 0.0, batch_first: bool = False) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.dropout, self.batch_first = dropout, batch_first
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        self.in_proj_bias = None
        self._qkv_same_embed_dim = False
        self.kept_heads: tuple[int, ...] = tuple(range(num_heads))
        self.original_heads = num_heads

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> UnfusedAttention:
        """The same attention, weights copied; raises ValueError for the options it lacks
        (``add_bias_kv``, ``add_zero_attn``)."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("attention heads cannot be removed from an nn.MultiheadAttention "
                             "built with add_bias_kv or add_zero_attn")
        bias = mha.in_proj_bias is not None
        attention = cls(mha.embed_dim, mha.num_heads, mha.head_dim, kdim=mha.kdim,
                        vdim=mha.vdim, bias=bias, dropout=mha.dropout,
                        batch_first=mha.batch_first)
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.chunk(3)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        with torch.no_grad():
            for layer, weight in zip(projections, weights, strict=True):
                layer.weight.copy_(weight)
            if bias:
                for layer, b in zip(projections, mha.in_proj_bias.chunk(3), strict=True):
                    layer.bias.copy_(b)
            attention.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                attention.out_proj.bias.copy_(mha.out_proj.bias)
        return attention.to(mha.out_proj.weight.device).train(mha.training)

    def keep_heads(self, heads: Sequence[int]) -> None:
        """Keep only ``heads`` (indices among the current heads, at least one), in place."""
        heads = _slice_heads(self, heads)
        self.kept_heads = tuple(self.kept_heads[h] for h in heads)
        self.num_heads = len(heads)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward``: boolean masks mark positions that may not
        be attended (True), float masks are added to the scores."""
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, t, s, h = query.shape[0], query.shape[1], key.shape[1], self.num_heads
        q = self.q_proj(query).view(n, t, h, -1).transpose(1, 2)
        k = self.k_proj(key).view(n, s, h, -1).transpose(1, 2)
        v = self.v_proj(value).view(n, s, h, -1).transpose(1, 2)
        mask = self._scores_mask(attn_mask, key_padding_mask, n, t, s, q.dtype)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores + mask
            weights = F.dropout(scores.softmax(dim=-1), dropout, self.training)
            out = weights @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.out_proj(out.transpose(1, 2).reshape(n, t, -1))
        if unbatched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _scores_mask(self, attn_mask, key_padding_mask, n, t, s, dtype):
        """One additive mask broadcastable to the scores (n, heads, t, s), or None."""
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, dtype)
            if mask.dim() == 3:  # one mask per (batch, original head)
                mask = mask.view(n, self.original_heads, t, s)[:, list(self.kept_heads)]
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, dtype).view(n, 1, 1, s)
            mask = padding if mask is None else mask + padding
        return mask


def _checked_heads(heads: Sequence[int], count: int) -> list[int]:
    heads = sorted(set(heads))
    if not heads or heads[0] < 0 or heads[-1] >= count:
        raise ValueError(f"heads to keep must be a non-empty subset of range({count}). "
                         f"Got {heads}.")
    return heads


def _keep_rows(layer: nn.Linear, rows: torch.Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight[rows].clone())
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias[rows].clone())
    layer.out_features = len(rows)


def _slice_heads(attention, heads: Sequence[int]) -> list[int]:
    """Cut the rows of ``heads`` (kept, sorted) from the attention's q / k / v projections
    and the matching columns from its ``out_proj``; return the kept heads."""
    heads = _checked_heads(heads, attention.num_heads)
    size = attention.q_proj.out_features // attention.num_heads
    rows = torch.cat([torch.arange(h * size, (h + 1) * size) for h in heads])
    with torch.no_grad():
        for layer in (attention.q_proj, attention.k_proj, attention.v_proj):
            _keep_rows(layer, rows)
        out = attention.out_proj
        out.weight = nn.Parameter(out.weight[:, rows].clone())
        out.in_features = len(rows)
    return heads


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
        heads = _slice_heads(self, heads)
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
        heads = _checked_heads(heads, self.num_heads)
        width = self.qkv.out_features // 3
        size = width // self.num_heads
        rows = torch.cat([torch.arange(h * size, (h + 1) * size) for h in heads])
        fused = torch.cat([rows + part * width for part in range(3)])
        with torch.no_grad():
            _keep_rows(self.qkv, fused)
            self.out_proj.weight = nn.Parameter(self.out_proj.weight[:, rows].clone())
            self.out_proj.in_features = len(rows)
        self.module.num_heads = len(heads)
        self.refresh()

    def refresh(self) -> None:
        """Set the split and head sizes from the fused projection's width, after
        Torch-Pruning shrank every head evenly."""
        width = self.qkv.out_features // 3
        self.module.split_size = width
        self.module.head_dim = width // self.num_heads
        if hasattr(self.module, "embed_dim"):
            self.module.embed_dim = width


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


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    return mask.to(dtype)


def unfuse_attention(model: nn.Module) -> list[UnfusedAttention]:
    """Replace every ``nn.MultiheadAttention`` in ``model`` by an equivalent
    ``UnfusedAttention``, in place; return all the model's ``UnfusedAttention`` modules."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention):
            model.set_submodule(name, UnfusedAttention.from_multihead(module))
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False  # that path reads nn.MultiheadAttention weights
    return [m for m in model.modules() if isinstance(m, UnfusedAttention)]


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
