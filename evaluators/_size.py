"""Model size: bytes of the serialized tensors the deployed model reads.

What is stored is what counts: int8 weights with their scales (PT2E graphs: only what the
graph reads), the CSR / BSR components of sparse layers, k-means codebooks with their
packed k-bit indices, bf16 weights at two bytes; never a stale float copy.
"""

from __future__ import annotations

import io
import math

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


def estimated_size_mb(model: nn.Module, formats: dict[str, str], *, cluster_bits: int = 0,
                      clustered: frozenset[str] = frozenset()) -> float:
    """The deployed size ``size_mb`` would give the float ``model`` once its weight layers
    are stored in ``formats`` (``{layer name: format}``) and the ``clustered`` ones as
    ``cluster_bits``-bit codebook indices, estimated without converting it (a prediction):
    placeholders of the stored dtypes and shapes are serialized, an int8 weight with a
    float scale and an integer zero point per output channel, a whole-bf16 model's
    floating tensors at two bytes, a codebook's packed indices as bytes, BatchNorm folded
    away under static int8."""
    whole_bf16 = bool(formats) and all(f == "bf16" for f in formats.values())
    folded = "int8" in formats.values()  # static int8 folds BatchNorm into the convolutions
    modules = dict(model.named_modules())
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in deployed_tensors(model).items():
        owner, _, leaf = name.rpartition(".")
        fmt = formats.get(owner, "bf16" if whole_bf16 else "fp32")
        if folded and isinstance(modules.get(owner), nn.modules.batchnorm._BatchNorm):
            continue
        if not tensor.is_floating_point():
            stored[name] = torch.empty(tensor.shape, dtype=tensor.dtype)
        elif leaf == "weight" and owner in formats and fmt.startswith("int8"):
            stored[name] = torch.empty(tensor.shape, dtype=torch.int8)
            stored[name + ".scale"] = torch.empty(tensor.shape[0])
            stored[name + ".zero_point"] = torch.empty(tensor.shape[0], dtype=torch.int64)
        elif leaf == "weight" and owner in clustered and cluster_bits:
            stored[name] = torch.empty(math.ceil(tensor.numel() * cluster_bits / 8),
                                       dtype=torch.uint8)
            stored[name + ".codebook"] = torch.empty(2 ** cluster_bits)
        else:
            dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
            stored[name] = torch.empty(tensor.shape, dtype=dtype)
    buffer = io.BytesIO()
    torch.save(stored, buffer)
    return buffer.getbuffer().nbytes / 1e6
