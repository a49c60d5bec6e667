"""Each compression technique on a residual CNN with depthwise convolutions, an MLP and a
small transformer encoder: what it promises, checked."""

import copy

import pytest
import torch
from torch import nn

from paretoslim.evaluators import size_mb
from paretoslim.spaces import (
    SparseConv2d,
    SparseLinear,
    densify,
    export_dynamic_batch,
    sparsify,
)


def _mask_(layer: nn.Module, keep: float, block: int = 1, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    w = layer.weight.data
    m = w.reshape(w.shape[0], -1)
    rows, cols = m.shape[0] // block, m.shape[1] // block
    mask = (torch.rand(rows, 1, cols, 1, generator=g) < keep).float()
    mask = mask.expand(rows, block, cols, block).reshape(m.shape)
    m.mul_(mask)


@pytest.mark.parametrize("block", [1, 4])
def test_sparse_storage_is_exact_exportable_smaller_and_densifies(block):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(32 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    _mask_(model[0], 0.15, 1)
    _mask_(model[3], 0.1, block)
    x = torch.randn(3, 8, 6, 6)
    expected = model(x)
    dense_size = size_mb(model)
    replaced = sparsify(model, blocksize=block)
    assert replaced == ["0", "3"]  # the last layer is dense: CSR would not be smaller
    assert isinstance(model[0], SparseConv2d) and isinstance(model[3], SparseLinear)
    assert model[3].layout == ("bsr" if block > 1 else "csr")
    assert size_mb(model) < 0.4 * dense_size
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(model[3].sparse_weight().to_dense(), model[3].dense_weight())
    program = export_dynamic_batch(model, x).module()
    torch.testing.assert_close(program(x[:2]), expected[:2], rtol=0, atol=0)
    densify(model)
    assert type(model[0]) is nn.Conv2d and type(model[3]) is nn.Linear
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_sparsify_leaves_dense_layers_dense():
    model = nn.Sequential(nn.Linear(8, 8))
    before = copy.deepcopy(model)
    assert sparsify(model) == []
    assert type(model[0]) is nn.Linear
    assert torch.equal(model[0].weight, before[0].weight)
