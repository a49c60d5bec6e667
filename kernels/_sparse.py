"""Sparse execution of sparsely stored Linear layers: CSR / BSR ``torch.sparse.mm``.

A model's ``SparseLinear`` layers compute with their weight rebuilt dense by default, so
a compiler folds them into ordinary dense GEMMs. ``sparse_execution`` gives the variant
whose layers call the ``paretoslim::sparse_linear`` operator instead, which runs
``torch.sparse.mm`` on the stored components. That variant exports and compiles with
AOTInductor (the operator runs through its Python fallback); the process that loads the
compiled package must have imported this module. Which variant is faster depends on the
sparsity, the shape and the batch: the latency job measures both.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..spaces import SparseLinear, StoredWeight, densify


@torch.library.custom_op("paretoslim::sparse_linear", mutates_args=())
def sparse_linear(x: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                  values: torch.Tensor, bias: torch.Tensor | None, rows: int, cols: int,
                  block_rows: int, block_cols: int) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` (``rows x cols``) given by its CSR or BSR components.

    A block size of 1 x 1 means CSR; anything else BSR with ``values`` of shape
    ``(blocks, block_rows, block_cols)``.
    """
    build = (torch.sparse_csr_tensor if (block_rows, block_cols) == (1, 1)
             else torch.sparse_bsr_tensor)
    weight = build(crow_indices, col_indices.to(torch.int32), values, (rows, cols),
                   check_invariants=False)
    flat = x.reshape(-1, cols)
    out = torch.sparse.mm(weight, flat.t()).t()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], rows)


@sparse_linear.register_fake
def _(x, crow_indices, col_indices, values, bias, rows, cols, block_rows, block_cols):
    return x.new_empty(*x.shape[:-1], rows)


class SparseMatmulLinear(nn.Module):
    """A ``SparseLinear`` computing through ``torch.sparse.mm`` (same buffers, same result)."""

    def __init__(self, layer: SparseLinear):
        super().__init__()
        self.register_buffer("crow_indices", layer.crow_indices.clone())
        self.register_buffer("col_indices", layer.col_indices.clone())
        self.register_buffer("values", layer.values.detach().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.shape, self.blocksize = layer.shape, layer.blocksize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.shape
        return torch.ops.paretoslim.sparse_linear(
            x, self.crow_indices, self.col_indices, self.values, self.bias, rows, cols,
            *self.blocksize)


def sparse_layers(model: nn.Module) -> list[str]:
    """Names of the model's sparsely stored Linear layers."""
    return [name for name, m in model.named_modules() if isinstance(m, SparseLinear)]


def dense_execution(model: nn.Module) -> nn.Module:
    """``model`` as compiled kernels should run it: a copy with every stored weight form
    (sparse components, k-means codebooks) decoded to plain layers, since compilers do
    not fold the per-call rebuild; ``model`` itself when it has none."""
    if not any(isinstance(m, StoredWeight) for m in model.modules()):
        return model
    return densify(copy.deepcopy(model))


def sparse_execution(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` whose sparse Linear layers run ``torch.sparse.mm`` and whose other
    stored weight forms are decoded dense; None if it has no sparse Linear layer (or they
    sit inside a quantized or bf16 wrapper, where only fp32 runs sparse)."""
    if not sparse_layers(model) or any(
            p.dtype != torch.float32 for p in model.parameters()):
        return None
    copied = copy.deepcopy(model)
    for parent in list(copied.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SparseLinear):
                setattr(parent, name, SparseMatmulLinear(child))
    return densify(copied)
