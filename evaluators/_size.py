"""Model size: bytes of the serialized tensors the deployed model reads.

What is stored is what counts: int8 weights with their scales (PT2E graphs: only what the
graph reads), the CSR / BSR components of sparse layers, k-means codebooks with their
packed k-bit indices, bf16 weights at two bytes; never a stale float copy.
"""

from __future__ import annotations

import io

import torch
from torch import nn

from ..spaces import graph_reads


def deployed_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and buffers the model reads, once each.

    For an FX GraphModule only the attributes its graph references count, since
    converted PT2E graphs keep stale fp32 weights registered. Tied tensors count once.
    """
    state = model.state_dict(keep_vars=False)
    if isinstance(model, torch.fx.GraphModule):
        state = {k: v for k, v in state.items() if graph_reads(model, k)}
    unique: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, tensor in state.items():
        if type(tensor) is torch.Tensor:  # tensor subclasses (torchao) own their storage
            key: tuple = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                          tuple(tensor.shape))
        else:
            key = (id(tensor),)
        if key in seen:
            continue
        seen.add(key)
        unique[name] = tensor
    return unique


def serialized_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save`` of the model's deployed tensors."""
    buffer = io.BytesIO()
    torch.save(deployed_tensors(model), buffer)
    return buffer.getbuffer().nbytes


def size_mb(model: nn.Module) -> float:
    """``serialized_size_bytes`` in megabytes (10^6 bytes)."""
    return serialized_size_bytes(model) / 1e6
