"""Sparse storage of pruned weights: CSR / BSR components kept as plain buffers.

A sparse module stores its 2-D weight matrix (a Conv2d's weight flattened to
``out x (in / groups * kh * kw)``) as ``crow_indices`` (int32), ``col_indices`` (int16
when the column count allows, else int32) and ``values`` (the weight dtype; ``nnz`` for
CSR, ``nnzb x bh x bw`` for BSR), plus ``shape``, ``layout`` and ``blocksize`` attributes.
The components are buffers, so ``torch.export`` and the size evaluator see them.
``forward`` rebuilds the dense weight from the components with index operations
(exact, exportable; a compiler with frozen weights folds it into a constant) and applies
the layer; ``sparse_weight()`` gives the torch CSR / BSR tensor for ``torch.sparse.mm``.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Layout = Literal["csr", "bsr"]
_INT16_MAX = 32767
TENSOR_OVERHEAD = 300  # bytes torch.save spends per stored tensor, beyond its data


class StoredWeight(nn.Module):
    """A layer whose weight is kept in a compact stored form (sparse components, a k-means
    codebook) and rebuilt in ``forward``. Compilers do not fold that rebuild into a
    constant, so execution uses ``to_dense()``, the equivalent plain layer (``densify``)."""

    def to_dense(self) -> nn.Module:
        raise NotImplementedError

    def _filled(self, layer: nn.Module, weight: torch.Tensor) -> nn.Module:
        """``layer`` (fresh, same shapes) moved to ``weight``'s device and dtype, holding
        ``weight`` and this layer's bias."""
        layer = layer.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer


class _SparseWeight(StoredWeight):
    """The CSR / BSR components of one weight matrix and their dense reconstruction."""

    def _store(self, matrix: torch.Tensor, layout: Layout, blocksize: tuple[int, int]) -> None:
        if layout not in ("csr", "bsr"):
            raise ValueError(f"layout must be 'csr' or 'bsr'. Got {layout!r} instead.")
        m, n = matrix.shape
        bh, bw = blocksize if layout == "bsr" else (1, 1)
        if m % bh or n % bw:
            raise ValueError(f"blocksize {blocksize} does not divide the weight shape {(m, n)}")
        matrix = matrix.detach()
        with warnings.catch_warnings():  # "CSR support is in beta"
            warnings.simplefilter("ignore")
            sparse = matrix.to_sparse_bsr((bh, bw)) if layout == "bsr" else matrix.to_sparse_csr()
        cols = sparse.col_indices()
        col_dtype = torch.int16 if n // bw <= _INT16_MAX else torch.int32
        self.register_buffer("crow_indices", sparse.crow_indices().to(torch.int32))
        self.register_buffer("col_indices", cols.to(col_dtype))
        self.register_buffer("values", sparse.values().clone())
        self.shape = (m, n)
        self.layout = layout
        self.blocksize = (bh, bw)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (layers such as ``nn.TransformerEncoderLayer`` read it directly)."""
        return self.dense_weight().reshape(getattr(self, "kernel_shape", self.shape))

    @property
    def nnz(self) -> int:
        """Stored weight entries (for BSR: blocks times block size)."""
        return self.values.numel()

    def sparse_weight(self) -> torch.Tensor:
        """The weight matrix as a torch CSR / BSR tensor (int32 indices)."""
        crow, col = self.crow_indices, self.col_indices.to(torch.int32)
        build = torch.sparse_bsr_tensor if self.layout == "bsr" else torch.sparse_csr_tensor
        return build(crow, col, self.values, self.shape, check_invariants=False)

    def dense_weight(self) -> torch.Tensor:
        """The weight matrix as a dense tensor, rebuilt from the components."""
        m, n = self.shape
        bh, bw = self.blocksize
        rows_of_blocks, cols_of_blocks = m // bh, n // bw
        count = self.col_indices.shape[0]
        positions = torch.arange(count, device=self.values.device)
        rows = torch.searchsorted(self.crow_indices[1:].long(), positions, right=True)
        flat = rows * cols_of_blocks + self.col_indices.long()
        if self.layout == "csr":
            dense = self.values.new_zeros(m * n).index_put((flat,), self.values)
            return dense.reshape(m, n)
        blocks = self.values.new_zeros(rows_of_blocks * cols_of_blocks, bh, bw)
        blocks = blocks.index_put((flat,), self.values)
        return (blocks.reshape(rows_of_blocks, cols_of_blocks, bh, bw)
                .permute(0, 2, 1, 3).reshape(m, n))

    def extra_repr(self) -> str:
        m, n = self.shape
        return (f"shape={self.shape}, layout={self.layout}, blocksize={self.blocksize}, "
                f"density={self.nnz / (m * n):.3f}")


class SparseLinear(_SparseWeight):
    """A Linear layer whose weight is stored as CSR / BSR components."""

    def __init__(self, layer: nn.Linear, layout: Layout = "csr",
                 blocksize: tuple[int, int] = (1, 1)):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._store(layer.weight, layout, blocksize)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def to_dense(self) -> nn.Linear:
        return self._filled(nn.Linear(self.in_features, self.out_features,
                                      bias=self.bias is not None), self.dense_weight())


class SparseConv2d(_SparseWeight):
    """A Conv2d whose weight, flattened to ``out x (in / groups * kh * kw)``, is stored sparse."""

    def __init__(self, layer: nn.Conv2d, layout: Layout = "csr",
                 blocksize: tuple[int, int] = (1, 1)):
        super().__init__()
        if layer.padding_mode != "zeros":
            raise ValueError(f"sparse storage supports zero padding only, not "
                             f"{layer.padding_mode!r}")
        self.kernel_shape = tuple(layer.weight.shape)
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups
        self._store(layer.weight.reshape(layer.weight.shape[0], -1), layout, blocksize)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dense_weight().reshape(self.kernel_shape)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def to_dense(self) -> nn.Conv2d:
        out_ch, in_per_group, kh, kw = self.kernel_shape
        layer = nn.Conv2d(in_per_group * self.groups, out_ch, (kh, kw), stride=self.stride,
                          padding=self.padding, dilation=self.dilation, groups=self.groups,
                          bias=self.bias is not None)
        return self._filled(layer, self.dense_weight().reshape(self.kernel_shape))


SPARSE_MODULES = (SparseLinear, SparseConv2d)


def sparse_bytes(matrix: torch.Tensor, layout: Layout = "csr",
                 blocksize: tuple[int, int] = (1, 1)) -> int:
    """Bytes of the CSR / BSR components of a 2-D ``matrix`` as the sparse modules store them."""
    m, n = matrix.shape
    bh, bw = blocksize if layout == "bsr" else (1, 1)
    nonzero = matrix.reshape(m // bh, bh, n // bw, bw).ne(0).any(dim=(1, 3))
    stored = int(nonzero.sum())
    col_bytes = 2 if n // bw <= _INT16_MAX else 4
    return (m // bh + 1) * 4 + stored * (col_bytes + bh * bw * matrix.element_size())


def _matrix(layer: nn.Module) -> torch.Tensor:
    return layer.weight.detach().reshape(layer.weight.shape[0], -1)


def sparsify(model: nn.Module, blocksize: int = 1) -> list[str]:
    """Replace each Linear / Conv2d whose sparse storage is smaller than its dense weight by
    its sparse module, in place; return the names of the replaced layers. The comparison
    counts the serialization overhead of the two extra tensors.

    ``blocksize == 1`` stores CSR; a larger value stores BSR with square blocks of that
    size where they divide the weight, CSR elsewhere. Quantized and other layer types are
    left alone.
    """
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1. Got {blocksize} instead.")
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) not in (nn.Linear, nn.Conv2d):
                continue
            if isinstance(child, nn.Conv2d) and child.padding_mode != "zeros":
                continue
            if type(child.weight.data) is not torch.Tensor or not child.weight.is_floating_point():
                continue  # already quantized (a torchao tensor subclass)
            matrix = _matrix(child)
            layout: Layout = "csr"
            block = (1, 1)
            if blocksize > 1 and not (matrix.shape[0] % blocksize or matrix.shape[1] % blocksize):
                layout, block = "bsr", (blocksize, blocksize)
            stored = sparse_bytes(matrix, layout, block) + 2 * TENSOR_OVERHEAD
            if stored >= matrix.numel() * matrix.element_size():
                continue
            cls = SparseLinear if isinstance(child, nn.Linear) else SparseConv2d
            setattr(parent, name, cls(child, layout, block))
            replaced.append(f"{parent_name}.{name}" if parent_name else name)
    return replaced


def densify(model: nn.Module) -> nn.Module:
    """Replace every layer with a stored weight form (``StoredWeight``: sparse, k-means
    shared) by its plain Linear / Conv2d equivalent, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, StoredWeight):
                setattr(parent, name, child.to_dense())
    return model
