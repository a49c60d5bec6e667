"""Weight sharing (Deep Compression): each layer's weights clustered by k-means into a
codebook of 2^k values, stored as the codebook plus packed k-bit indices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._config import Config, param
from ._numerics import kind_formats, shared_weight_layers
from ._schemes import scheme
from ._sparse import TENSOR_OVERHEAD, StoredWeight
from ._technique import Context, Phase, Technique, register


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers in [0, 2^bits) packed little-endian along the last dimension into uint8:
    n integers take ceil(n * bits / 8) bytes."""
    if codes.numel() and (codes.min() < 0 or codes.max() >= 2 ** bits):
        raise ValueError(f"codes must lie in [0, {2 ** bits}) to pack at {bits} bits")
    shifts = torch.arange(bits, device=codes.device)
    stream = ((codes.long().unsqueeze(-1) >> shifts) & 1).flatten(-2)
    stream = F.pad(stream, (0, (-stream.shape[-1]) % 8)).unflatten(-1, (-1, 8))
    return (stream << torch.arange(8, device=codes.device)).sum(dim=-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``count`` integers (int64) along the last
    dimension."""
    packed = packed.long()
    if 8 % bits == 0:  # whole integers in each byte: one shift per integer, not per bit
        shifts = torch.arange(0, 8, bits, device=packed.device)
        return ((packed.unsqueeze(-1) >> shifts) & (2 ** bits - 1)).flatten(-2)[..., :count]
    shifts = torch.arange(8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., : count * bits]
    weights = 1 << torch.arange(bits, device=packed.device)
    return (stream.unflatten(-1, (count, bits)) * weights).sum(dim=-1)


class _Clustered(StoredWeight):
    """A layer whose weight is ``codebook[indices]``, indices packed at ``bits`` each."""

    def _store(self, weight: torch.Tensor, bits: int, seed: int) -> None:
        codebook, codes = kmeans_codebook(weight.detach(), bits, seed)
        self.bits = bits
        self.weight_shape = tuple(weight.shape)
        self.register_buffer("codebook", codebook.to(weight.dtype))
        self.register_buffer("codes", pack_bits(codes, bits))

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (layers such as ``nn.TransformerEncoderLayer`` read it directly)."""
        return self.dense_weight()

    def dense_weight(self) -> torch.Tensor:
        count = int(np.prod(self.weight_shape))
        indices = unpack_bits(self.codes, self.bits, count)
        return self.codebook[indices].reshape(self.weight_shape)

    def extra_repr(self) -> str:
        return f"weight_shape={self.weight_shape}, bits={self.bits}"


class ClusteredLinear(_Clustered):
    """A Linear layer with k-means shared weights."""

    def __init__(self, layer: nn.Linear, bits: int, seed: int = 0):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._store(layer.weight, bits, seed)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def to_dense(self) -> nn.Linear:
        return self._filled(nn.Linear(self.in_features, self.out_features,
                                      bias=self.bias is not None), self.dense_weight())


class ClusteredConv2d(_Clustered):
    """A Conv2d with k-means shared weights (zero padding)."""

    def __init__(self, layer: nn.Conv2d, bits: int, seed: int = 0):
        super().__init__()
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups
        self._store(layer.weight, bits, seed)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.dense_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)

    def to_dense(self) -> nn.Conv2d:
        out_ch, in_per_group, kh, kw = self.weight_shape
        layer = nn.Conv2d(in_per_group * self.groups, out_ch, (kh, kw), stride=self.stride,
                          padding=self.padding, dilation=self.dilation, groups=self.groups,
                          bias=self.bias is not None)
        return self._filled(layer, self.dense_weight())


CLUSTERED_MODULES = (ClusteredLinear, ClusteredConv2d)


def kmeans_codebook(weight: torch.Tensor, bits: int, seed: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook of at most 2^bits float32 values, index of each weight) by 1-D k-means.

    scikit-learn's KMeans with linear initialization over [min, max] (the best of Deep
    Compression's initializations), one run, so the result is deterministic. Zero weights
    (from pruning) keep an exact zero entry and are not clustered, so sparsity survives.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8]. Got {bits} instead.")
    from sklearn.cluster import KMeans

    values = weight.detach().float().reshape(-1)
    zero = values == 0
    has_zero = bool(zero.any()) and bool((~zero).any())
    data = values[~zero] if has_zero else values
    k = 2 ** bits - (1 if has_zero else 0)
    unique = torch.unique(data)
    if unique.numel() <= k:
        centers = unique
    else:
        init = np.linspace(float(data.min()), float(data.max()), k).reshape(-1, 1)
        km = KMeans(n_clusters=k, init=init, n_init=1, max_iter=100, random_state=seed)
        km.fit(data.numpy().reshape(-1, 1).astype(np.float64))
        centers = torch.from_numpy(km.cluster_centers_.reshape(-1)).float()
    if has_zero:
        centers = torch.cat([torch.zeros(1), centers])
    codes = (values.reshape(-1, 1) - centers.reshape(1, -1)).abs().argmin(dim=1)
    if has_zero:
        codes = torch.where(zero, torch.zeros_like(codes), codes)
    return centers, codes


def cluster_weights(model: nn.Module, bits: int, *, skip: frozenset[str] = frozenset(),
                    seed: int = 0) -> list[str]:
    """Replace each float Linear / Conv2d (except the names in ``skip``) by its k-means
    shared form with a ``2^bits`` codebook, in place; return the replaced names. Layers
    too small for the codebook and packed indices to be smaller than their weight stay."""
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) not in (nn.Linear, nn.Conv2d) or full in skip:
                continue
            if type(child.weight.data) is not torch.Tensor or not child.weight.is_floating_point():
                continue
            if isinstance(child, nn.Conv2d) and child.padding_mode != "zeros":
                continue
            w = child.weight
            packed = (w.numel() * bits + 7) // 8 + 2 ** bits * w.element_size()
            if packed + TENSOR_OVERHEAD >= w.numel() * w.element_size():
                continue  # too small for a codebook to pay off
            cls = ClusteredLinear if isinstance(child, nn.Linear) else ClusteredConv2d
            setattr(parent, name, cls(child, bits, seed))
            replaced.append(full)
    return replaced


@dataclass(frozen=True)
class WeightSharingConfig(Config):
    """``bits`` k > 0 shares each float layer's weights through a k-means codebook of 2^k
    values, stored as packed k-bit indices (0: off)."""

    bits: int = param(0, low=0, high=8, integer=True, off=True,
                      note="k-means codebook of 2^k values (layers stored in float)")


@register
class WeightSharing(Technique):
    """After the fine-tune, each Linear / Conv2d stored in a float format and not kept in
    float is clustered."""

    section, config, stage = "weight_sharing", WeightSharingConfig, "weight sharing"
    phase = Phase.WEIGHT_SHARING

    def apply(self, model: nn.Module, config: WeightSharingConfig, ctx: Context) -> nn.Module:
        if config.bits:
            shared = shared_weight_layers(ctx.layer_formats, ctx.float_layers)
            skip = frozenset(ctx.float_layers) | (frozenset(ctx.layer_formats) - shared)
            clustered = cluster_weights(model, config.bits, skip=skip, seed=ctx.seed)
            ctx.facts["clustered_layers"] = len(clustered)
            ctx.facts["cluster_bits"] = config.bits
        return model

    def normalize(self, config: WeightSharingConfig, sections: dict[str, Any]
                  ) -> WeightSharingConfig:
        # integer weights are stored as their own integers: a codebook acts on the layers
        # an integer scheme's per-kind overrides leave in a float format
        q = sections["quantization"]
        integer = scheme(q.scheme).integer_weights and not kind_formats(q)
        return WeightSharingConfig() if integer else config

    def label(self, config: WeightSharingConfig) -> str:
        return f"kmeans{config.bits}b" if config.bits else ""
