"""Multi-head attention with separate projections, whose heads can be cut out."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


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
        heads = slice_heads(self, heads)
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


def checked_heads(heads: Sequence[int], count: int) -> list[int]:
    """``heads`` sorted, checked to be a non-empty subset of ``range(count)``."""
    heads = sorted(set(heads))
    if not heads or heads[0] < 0 or heads[-1] >= count:
        raise ValueError(f"heads to keep must be a non-empty subset of range({count}). "
                         f"Got {heads}.")
    return heads


def head_rows(heads: Sequence[int], size: int) -> torch.Tensor:
    """The indices of ``heads``' dimensions, ``size`` each, in a projection's output."""
    return torch.cat([torch.arange(h * size, (h + 1) * size) for h in heads])


def keep_rows(layer: nn.Linear, rows: torch.Tensor) -> None:
    """Keep the output features ``rows`` of ``layer`` (weights and bias), in place."""
    layer.weight = nn.Parameter(layer.weight[rows].clone())
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias[rows].clone())
    layer.out_features = len(rows)


def keep_columns(layer: nn.Linear, columns: torch.Tensor) -> None:
    """Keep the input features ``columns`` of ``layer``, in place."""
    layer.weight = nn.Parameter(layer.weight[:, columns].clone())
    layer.in_features = len(columns)


def slice_heads(attention, heads: Sequence[int]) -> list[int]:
    """Cut the rows of ``heads`` (kept, sorted) from the attention's q / k / v projections
    and the matching columns from its ``out_proj``; return the kept heads."""
    heads = checked_heads(heads, attention.num_heads)
    rows = head_rows(heads, attention.q_proj.out_features // attention.num_heads)
    with torch.no_grad():
        for layer in (attention.q_proj, attention.k_proj, attention.v_proj):
            keep_rows(layer, rows)
        keep_columns(attention.out_proj, rows)
    return heads


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
