"""Reading weights in one orientation, whatever the layer class (nn.Linear or GPT-2's Conv1D)."""

from __future__ import annotations

import torch
from torch import nn


def weight_in_out(module: nn.Module) -> torch.Tensor:
    """The weight as [in_features, out_features].

    nn.Linear stores [out, in]; transformers' Conv1D (GPT-2) stores [in, out] and has ``nf``.
    """
    if isinstance(module, nn.Linear):
        return module.weight.T
    if hasattr(module, "nf") and module.weight.dim() == 2:
        return module.weight
    if isinstance(module, nn.Embedding):
        return module.weight.T
    raise TypeError(f"cannot read a projection weight from {type(module).__name__}")


def in_features(module: nn.Module) -> int:
    return weight_in_out(module).shape[0]


def out_features(module: nn.Module) -> int:
    return weight_in_out(module).shape[1]


def bias_of(module: nn.Module) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    return b if isinstance(b, torch.Tensor) else None
