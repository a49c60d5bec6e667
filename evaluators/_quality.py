"""Quality metrics: higher is better."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..spaces import model_io


def accuracy(model: nn.Module, batches: Iterable) -> float:
    """Top-1 classification accuracy of ``model`` over batches in any task batch form."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for inputs, targets in model_io.pairs(batches):
            predicted = model_io.predict(model, inputs).argmax(dim=-1)
            correct += (predicted == targets).sum().item()
            total += targets.numel()
    if total == 0:
        raise ValueError("the validation data yielded no samples")
    return correct / total
