"""The structure fingerprint: what a model's latency depends on, without its weight values."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from ..kernels import dense_execution
from ..spaces import SPARSE_MODULES


def structure_fingerprint(model: nn.Module, scheme: str, settings: dict[str, Any]) -> str:
    """A digest of the model as compiled kernels run it (module types, graph operations,
    tensor shapes and dtypes; sparse layers by their layout, shape and share of zeros
    rounded to a percent) together with ``scheme`` and the timing ``settings`` (target,
    batch, threads, lowering). Two models that differ only in trained weight values share
    it: per-tensor quantization parameters count by whether a zero point is used, not by
    their values (calibration sets them from the weights)."""
    dense = dense_execution(model)
    parts: list[Any] = [scheme, sorted(settings.items())]
    if isinstance(dense, torch.fx.GraphModule):
        parts.append([_operation(node) for node in dense.graph.nodes])
    parts.append([(name, type(m).__name__) for name, m in dense.named_modules()])
    parts.append([(name, list(t.shape), str(t.dtype), type(t).__name__)
                  for name, t in dense.state_dict().items()])
    parts.append([(name, m.layout, list(m.shape), _zeros_percent(m))
                  for name, m in model.named_modules() if isinstance(m, SPARSE_MODULES)])
    text = json.dumps(parts, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_PER_TENSOR = ("quantize_per_tensor", "dequantize_per_tensor")


def _operation(node: torch.fx.Node) -> str:
    """A graph node as the kernels see it: its operation and arguments, a per-tensor
    (de)quantization's scale left out and its zero point reduced to zero or not."""
    args = node.args
    if node.op == "call_function" and any(op in str(node.target) for op in _PER_TENSOR) \
            and len(args) >= 3 and isinstance(args[1], float) and isinstance(args[2], int):
        args = (args[0], "scale", "zero point" if args[2] else "no zero point", *args[3:])
    return f"{node.op} {node.target} {args} {node.kwargs}"


def _zeros_percent(module: nn.Module) -> int:
    dense = module.dense_weight()
    return round(100 * float((dense == 0).sum()) / dense.numel())
