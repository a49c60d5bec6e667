"""bf16 execution of a float32 model: its weights and floating inputs cast to bf16, its
logits returned in float32, chosen layers left in float32."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ._model_io import logits, to_floating


class Bf16Model(nn.Module):
    """Runs a bf16 copy of a model on float32 inputs and returns its logits in float32.

    Floating-point inputs are cast to bf16, integer ones (token ids) are passed as they are.
    The submodules named in ``keep_float`` stay float32 (their inputs are cast up, their
    outputs back down).
    """

    def __init__(self, model: nn.Module, keep_float: Iterable[str] = ()):
        super().__init__()
        self.model = model.to(torch.bfloat16)
        for name in keep_float:
            self.model.set_submodule(name, _Float32(self.model.get_submodule(name).float()))

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        args = tuple(to_floating(a, torch.bfloat16) for a in args)
        kwargs = {k: to_floating(t, torch.bfloat16) for k, t in kwargs.items()}
        return logits(self.model(*args, **kwargs)).float()


class _Float32(nn.Module):
    """A float32 layer inside a bf16 model."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.float()).to(x.dtype)


class Bf16Layer(nn.Module):
    """A layer computing in bf16 inside a float32 (or int8) model: its weights are bf16, its
    input is cast down and its output back to the input's dtype."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.to(torch.bfloat16)).to(x.dtype)
