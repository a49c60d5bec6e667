"""Low-rank factorization of Linear and Conv layers by truncated SVD."""

from __future__ import annotations

import torch
from torch import nn


def factorize_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    """``layer`` as two Linears through ``rank`` units: W ~= (U sqrt(S)) (sqrt(S) V^T)."""
    w = layer.weight.detach()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    first = nn.Linear(layer.in_features, rank, bias=False)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
    first.weight.data.copy_(root[:, None] * vh[:rank])
    second.weight.data.copy_(u[:, :rank] * root[None, :])
    if layer.bias is not None:
        second.bias.data.copy_(layer.bias.detach())
    return nn.Sequential(first, second)


def factorize_conv2d(layer: nn.Conv2d, rank: int) -> nn.Sequential:
    """``layer`` as a k x k conv to ``rank`` channels followed by a 1 x 1 conv."""
    w = layer.weight.detach()
    out_ch = w.shape[0]
    u, s, vh = torch.linalg.svd(w.reshape(out_ch, -1), full_matrices=False)
    root = s[:rank].sqrt()
    first = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, stride=layer.stride,
                      padding=layer.padding, dilation=layer.dilation, bias=False,
                      padding_mode=layer.padding_mode)
    second = nn.Conv2d(rank, out_ch, 1, bias=layer.bias is not None)
    first.weight.data.copy_((root[:, None] * vh[:rank]).reshape(rank, *w.shape[1:]))
    second.weight.data.copy_((u[:, :rank] * root[None, :]).reshape(out_ch, rank, 1, 1))
    if layer.bias is not None:
        second.bias.data.copy_(layer.bias.detach())
    return nn.Sequential(first, second)


def _cost_and_rank(layer: nn.Module, fraction: float) -> tuple[int, int, int] | None:
    """(rank, dense cost, factorized cost) per output position, or None if not factorizable."""
    if isinstance(layer, nn.Linear):
        m, n = layer.out_features, layer.in_features
        full = min(m, n)
        rank = max(1, round(fraction * full))
        return rank, m * n, rank * (m + n)
    if isinstance(layer, nn.Conv2d) and layer.groups == 1:
        m = layer.out_channels
        n = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
        full = min(m, n)
        rank = max(1, round(fraction * full))
        return rank, m * n, rank * (m + n)
    return None


def factorize(model: nn.Module, rank_fraction: float) -> tuple[nn.Module, int]:
    """Replace each Linear / Conv2d by its rank-``rank_fraction`` factorization, in place.

    A layer stays dense when the factorization would not reduce its cost
    (rank >= mn / (m + n)); grouped convolutions stay dense. Returns the model and the
    number of layers factorized; ``rank_fraction == 1`` changes nothing.
    """
    if rank_fraction >= 1.0:
        return model, 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            info = _cost_and_rank(child, rank_fraction)
            if info is None:
                continue
            rank, dense, factored = info
            if factored >= dense:
                continue
            if isinstance(child, nn.Linear):
                setattr(parent, name, factorize_linear(child, rank))
            else:
                setattr(parent, name, factorize_conv2d(child, rank))
            count += 1
    return model, count
