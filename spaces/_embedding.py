"""Embedding tables stored compactly: int8 rows with a scale each, or a k-means codebook of
16 values with two 4-bit indices per byte. In a text encoder the word-embedding table holds
a large share of the weights, and the integer schemes of the other layers leave it float."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._cluster import kmeans_codebook, pack_bits, unpack_bits
from ._config import Config, param
from ._sparse import TENSOR_OVERHEAD
from ._technique import Context, Phase, Technique, register


class Int8Embedding(nn.Module):
    """An ``nn.Embedding`` whose table is int8, one symmetric scale per row; a lookup
    gathers int8 rows and scales them (the whole table is never rebuilt)."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        table = embedding.weight.detach().float()
        scale = (table.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)
        self.register_buffer("table", (table / scale).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(embedding.weight.dtype))
        self.padding_idx = embedding.padding_idx
        self.num_embeddings, self.embedding_dim = embedding.weight.shape

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table, for code that reads an embedding's weight (its dtype)."""
        return self.table.to(self.scale.dtype) * self.scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table).to(self.scale.dtype) * F.embedding(ids, self.scale)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"


class KMeans4Embedding(nn.Module):
    """An ``nn.Embedding`` whose values share a k-means codebook of 16, stored as 4-bit
    indices, two per byte along each row; a lookup unpacks the gathered rows only."""

    def __init__(self, embedding: nn.Embedding, seed: int = 0):
        super().__init__()
        table = embedding.weight.detach()
        rows, dim = table.shape
        codebook, codes = kmeans_codebook(table, 4, seed)
        self.register_buffer("codes", pack_bits(codes.reshape(rows, dim), 4))
        self.register_buffer("codebook", codebook.to(table.dtype))
        self.padding_idx = embedding.padding_idx
        self.num_embeddings, self.embedding_dim = rows, dim

    @property
    def weight(self) -> torch.Tensor:
        """The table rebuilt, for code that reads an embedding's weight (its dtype)."""
        return self._values(self.codes)

    def _values(self, packed: torch.Tensor) -> torch.Tensor:
        return self.codebook[unpack_bits(packed, 4, self.embedding_dim)]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._values(F.embedding(ids, self.codes))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, 4-bit k-means codebook"


EMBEDDING_FORMS = {"int8": Int8Embedding, "kmeans4": KMeans4Embedding}


def compress_embeddings(model: nn.Module, form: str, seed: int = 0) -> list[str]:
    """Replace each float ``nn.Embedding`` of ``model`` by its ``form`` (``int8`` or
    ``kmeans4``), in place; return the replaced names. Tables too small for the stored form
    to be smaller stay."""
    kind = EMBEDDING_FORMS[form]
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Embedding or not child.weight.is_floating_point():
                continue
            rows, dim = child.weight.shape
            stored = rows * (dim if form == "int8" else (dim + 1) // 2) + 4 * rows
            if stored + TENSOR_OVERHEAD >= child.weight.numel() * child.weight.element_size():
                continue
            setattr(parent, name, kind(child, seed) if kind is KMeans4Embedding
                    else kind(child))
            replaced.append(f"{parent_name}.{name}" if parent_name else name)
    return replaced


@dataclass(frozen=True)
class EmbeddingConfig(Config):
    """``form`` stores every embedding table as ``int8`` rows with a scale each or as a
    ``kmeans4`` codebook of 16 values with packed 4-bit indices (``float``: off)."""

    form: str = param("float", choices=("float", "int8", "kmeans4"), off=True,
                      note="embedding tables (token, position)")


@register
class Embeddings(Technique):
    """After the fine-tune, the embedding tables take their stored form; the other layers'
    scheme is applied after it."""

    section, config, phase, stage = "embedding", EmbeddingConfig, Phase.EMBEDDING, "embeddings"

    def apply(self, model: nn.Module, config: EmbeddingConfig, ctx: Context) -> nn.Module:
        if config.form != "float":
            replaced = compress_embeddings(model, config.form, seed=ctx.seed)
            ctx.facts["compressed_embeddings"] = len(replaced)
            ctx.changed = ctx.changed or bool(replaced)
        return model

    def normalize(self, config: EmbeddingConfig, sections: dict[str, Any]) -> EmbeddingConfig:
        return config

    def label(self, config: EmbeddingConfig) -> str:
        return "" if config.form == "float" else f"emb-{config.form}"
