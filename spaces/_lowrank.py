"""Low-rank factorization of Linear and Conv layers by truncated SVD."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ._config import Config, param
from ._technique import Context, Phase, Technique, register


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


def factorize_tucker2(layer: nn.Conv2d, rank_out: int, rank_in: int) -> nn.Sequential:
    """``layer`` as Tucker-2 (HOSVD): a 1 x 1 conv to ``rank_in`` channels, a k x k core
    conv to ``rank_out`` channels, a 1 x 1 conv back to the output channels."""
    w = layer.weight.detach()
    out_ch, in_ch = w.shape[:2]
    u_out = torch.linalg.svd(w.reshape(out_ch, -1), full_matrices=False)[0][:, :rank_out]
    u_in = torch.linalg.svd(w.transpose(0, 1).reshape(in_ch, -1),
                            full_matrices=False)[0][:, :rank_in]
    core = torch.einsum("oikl,or,is->rskl", w, u_out, u_in)
    first = nn.Conv2d(in_ch, rank_in, 1, bias=False)
    middle = nn.Conv2d(rank_in, rank_out, layer.kernel_size, stride=layer.stride,
                       padding=layer.padding, dilation=layer.dilation, bias=False,
                       padding_mode=layer.padding_mode)
    last = nn.Conv2d(rank_out, out_ch, 1, bias=layer.bias is not None)
    first.weight.data.copy_(u_in.T.reshape(rank_in, in_ch, 1, 1))
    middle.weight.data.copy_(core)
    last.weight.data.copy_(u_out.reshape(out_ch, rank_out, 1, 1))
    if layer.bias is not None:
        last.bias.data.copy_(layer.bias.detach())
    return nn.Sequential(first, middle, last)


def rank_for(singular_values: torch.Tensor, fraction: float, energy: float) -> int:
    """The smaller of ``fraction`` of the full rank and the fewest leading singular values
    holding ``energy`` of the sum of squares (at least 1)."""
    full = singular_values.numel()
    rank = max(1, round(fraction * full))
    if energy < 1.0:
        share = torch.cumsum(singular_values.square(), 0) / singular_values.square().sum()
        rank = min(rank, int((share < energy - 1e-12).sum()) + 1)
    return max(1, min(rank, full))


def _factorized(layer: nn.Module, fraction: float, energy: float, conv: str
                ) -> nn.Module | None:
    """The factorized replacement of ``layer``, or None when it would not be cheaper."""
    if type(layer) is nn.Linear:
        m, n = layer.out_features, layer.in_features
    elif (type(layer) is nn.Conv2d and layer.groups == 1
          and tuple(layer.stride) != tuple(layer.kernel_size)):
        m = layer.out_channels
        n = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    else:
        return None
    w = layer.weight.detach()
    if isinstance(layer, nn.Conv2d) and conv == "tucker2":
        out_ch, in_ch = w.shape[:2]
        area = w.shape[2] * w.shape[3]
        r_out = rank_for(torch.linalg.svdvals(w.reshape(out_ch, -1)), fraction, energy)
        r_in = rank_for(torch.linalg.svdvals(w.transpose(0, 1).reshape(in_ch, -1)), fraction,
                        energy)
        cost = in_ch * r_in + r_in * r_out * area + r_out * out_ch
        return factorize_tucker2(layer, r_out, r_in) if cost < m * n else None
    rank = rank_for(torch.linalg.svdvals(w.reshape(m, -1)), fraction, energy)
    if rank * (m + n) >= m * n:  # rank >= mn / (m + n): no cheaper than dense
        return None
    return factorize_linear(layer, rank) if isinstance(layer, nn.Linear) else (
        factorize_conv2d(layer, rank))


# Modules whose forward reads their Linear children's weights directly: a factorized child
# would break them, so their layers stay dense.
_READS_WEIGHTS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.MultiheadAttention)


def factorize(model: nn.Module, rank_fraction: float, energy: float = 1.0,
              conv: str = "svd", skip: tuple[nn.Module, ...] = ()) -> tuple[nn.Module, int]:
    """Replace each Linear / Conv2d by its low-rank factorization, in place.

    The rank is ``rank_for(singular values, rank_fraction, energy)``; convolutions use
    ``svd`` (k x k conv to r channels, then 1 x 1) or ``tucker2``. A layer stays dense
    when the factorization would not reduce its cost (for SVD: rank >= mn / (m + n));
    grouped convolutions, patch embeddings (a convolution whose stride is its kernel size:
    vision transformers read its weight), the layers in ``skip`` and the layers inside
    ``nn.TransformerEncoderLayer`` / ``DecoderLayer`` / ``MultiheadAttention`` (their forward
    reads the weights directly) stay dense. Returns the model and the
    number of layers factorized; ``rank_fraction == energy == 1`` changes nothing.
    """
    if conv not in ("svd", "tucker2"):
        raise ValueError(f"conv must be 'svd' or 'tucker2'. Got {conv!r} instead.")
    if rank_fraction >= 1.0 and energy >= 1.0:
        return model, 0
    count = 0
    for parent in list(model.modules()):
        if isinstance(parent, _READS_WEIGHTS):
            continue
        for name, child in list(parent.named_children()):
            if any(child is s for s in skip):
                continue
            replacement = _factorized(child, rank_fraction, energy, conv)
            if replacement is not None:
                setattr(parent, name, replacement)
                count += 1
    return model, count


ConvFactorization = Literal["svd", "tucker2"]


@dataclass(frozen=True)
class LowRankConfig(Config):
    """Factorization of Linear / Conv layers; ``rank_fraction == energy == 1.0`` is off.

    The rank is the smaller of ``rank_fraction`` of the full rank and the fewest singular
    values holding ``energy`` of the squared spectrum. Convolutions use SVD (k x k conv to
    r channels, then 1 x 1) or Tucker-2 (1 x 1, k x k core, 1 x 1).
    """

    rank_fraction: float = param(1.0, low=0.0, high=1.0, low_open=True, off=True)
    energy: float = param(1.0, low=0.0, high=1.0, low_open=True, off=True,
                          note="share of the squared singular values kept")
    conv: ConvFactorization = param("svd", choices=("svd", "tucker2"))


@register
class LowRank(Technique):
    """Each Linear / Conv2d factorized where that reduces its cost."""

    section, config, phase, stage = "low_rank", LowRankConfig, Phase.LOW_RANK, "low-rank"

    def apply(self, model: nn.Module, config: LowRankConfig, ctx: Context) -> nn.Module:
        model, count = factorize(model, config.rank_fraction, config.energy, config.conv)
        ctx.facts["factorized_layers"] = count
        ctx.changed |= count > 0
        return model

    def normalize(self, config: LowRankConfig, sections: dict[str, Any]) -> LowRankConfig:
        off = config.rank_fraction == 1.0 and config.energy == 1.0
        return LowRankConfig() if off else config

    def label(self, config: LowRankConfig) -> str:
        return " ".join([f"rank={config.rank_fraction:g}"] * (config.rank_fraction != 1.0)
                        + [f"energy={config.energy:g}"] * (config.energy != 1.0))
